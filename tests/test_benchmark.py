"""benchmarks/train_step.py: the CPU run CI keeps alive, and the FLOP count the MFU figures rest on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ltxv_tuner import preflight
from ltxv_tuner.errors import UserError
from ltxv_tuner.models import ltxv as models
from ltxv_tuner.models import ltxv_tiny as tiny

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train_step.py"
sys.path.insert(0, str(SCRIPT.parent))

import train_step  # noqa: E402


def run_benchmark(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny", "--device", "cpu", "--dims", "128x96x17"]
    cmd += ["--steps", "2", "--warmup", "1", "--rounds", "2", "--json", str(out), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_cpu_tiny_run_prints_one_row_per_configuration(tmp_path):
    proc, result = run_benchmark(tmp_path)
    rows = result["rows"]
    # default preset: modes lora, full x checkpointing on, off
    assert [(r["mode"], r["ckpt"]) for r in rows] == [("lora", "on"), ("lora", "off"), ("full", "on"), ("full", "off")]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["dims"] == "128x96x17" and r["tokens"] == 36  # (128/32) * (96/32) * ((17-1)/8 + 1)
        assert r["steps"] == 2 and r["optimizer_steps"] == 5  # 1 warm-up + 2 rounds x 2 timed steps really ran
        assert r["s/step"] > 0 and r["tokens/s"] == pytest.approx(36 / r["s/step"])
        assert r["median_s/step"] >= r["s/step"] and r["bare_s/step"] > 0
        assert r["ours/bare"] == pytest.approx(r["s/step"] / r["bare_s/step"])
        assert r["TFLOP/s"] == pytest.approx(r["TFLOP/step"] / r["s/step"])
        assert r["MFU"] is None and r["peak_alloc_GiB"] is None and r["peak_reserved_GiB"] is None  # CPU: n/a
        assert r["loss"] > 0
    tcfg = dict(tiny.TINY_TRANSFORMER_CONFIG)
    lora_params = preflight._lora_params(tcfg, 128, ["to_k", "to_q", "to_v", "to_out.0"])
    assert rows[0]["rank"] == 128 and rows[0]["trainable_params"] == lora_params
    assert rows[2]["trainable_params"] == models.count_params(tcfg)  # full: every weight trains
    assert rows[2]["TFLOP/step"] > rows[0]["TFLOP/step"]

    lines = proc.stdout.splitlines()
    assert any("full: 3*F, LoRA: 2*F_linear + 3*F_attention" in line for line in lines if line.startswith("#"))
    header = next(line for line in lines if line.startswith("model "))
    for column in ("s/step", "tokens/s", "TFLOP/s", "MFU", "peak_alloc_GiB", "peak_reserved_GiB", "bare_s/step",
                   "ours/bare", "status"):  # fmt: skip
        assert column in header.split()
    table = [line.split() for line in lines if line.startswith("tiny ")]
    assert len(table) == 4
    for cells in table:
        assert cells[5] == "36" and cells[-1] == "ok"
        assert cells[10:13] == ["n/a", "n/a", "n/a"]  # MFU and peak memory are GPU-only


def test_a_failing_configuration_is_reported_in_its_row_and_the_rest_still_run(tmp_path):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed: the low_vram preset's optimizer would run")
    except ImportError:
        pass
    # low_vram preset: configs/low_vram_24gb.yaml (int8 base, adamw8bit, checkpointing on, its own rank)
    _, result = run_benchmark(tmp_path, "--preset", "low_vram", "--modes", "lora,full")
    rows = result["rows"]
    assert [(r["mode"], r["ckpt"]) for r in rows] == [("lora", "on"), ("full", "on")]
    try:
        import torchao  # noqa: F401

        lora_error = "error: training.optimizer_type: adamw8bit needs bitsandbytes"
    except ImportError:
        lora_error = "error: acceleration.quantize_base: int8 needs the torchao package"
    assert rows[0]["status"].startswith(lora_error) and rows[0]["rank"] == 32
    assert rows[1]["status"].startswith("error: acceleration.quantize_base: int8 needs model.training_mode: lora")


def test_linear_weight_counts_of_the_13b_follow_its_config():
    tcfg = models.transformer_config("LTXV_13B_097_DEV")
    d, layers, c = 4096, 48, 128
    counts = train_step.linear_weight_counts(tcfg)
    # per block: self-attention q,k,v,out (4 d^2), cross-attention q,out (2 d^2), feed-forward d->4d->d (8 d^2)
    assert counts["video"] == layers * 14 * d * d + 2 * c * d  # + proj_in, proj_out
    assert counts["text"] == layers * 2 * d * d + 2 * d * d  # cross-attention k,v + caption projection 4096->d->d


def test_step_flops_formula():
    tcfg = models.transformer_config("LTXV_13B_097_DEV")
    counts = {"video": 10, "text": 3, "sample": 99}
    t, length, d, n = 7488, 128, 4096, 48
    linear = 2 * t * 10 + 2 * length * 3
    attention = n * (4 * t * t * d + 4 * t * length * d)
    assert train_step.step_flops(tcfg, counts, t, length, 1, "full") == 3 * (linear + attention)
    assert train_step.step_flops(tcfg, counts, t, length, 2, "lora") == 2 * (2 * linear + 3 * attention)


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0), ("Some GPU", None)],
)
def test_peak_by_device_name(name, peak):
    assert train_step.peak_tflops_for(name) == peak


def test_bad_dims_name_the_flag_and_the_fix():
    with pytest.raises(UserError, match=r"--dims: 100x96x17: width must be a positive multiple of 32"):
        train_step.parse_dims("100x96x17")


def test_preprocess_benchmark_runs_on_cpu_and_prints_every_figure(tmp_path):
    """benchmarks/preprocess.py kept alive: a 3-clip, 1-round run on the CPU prints each figure it promises. It
    asserts itself that adding one clip encodes exactly one latent."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "preprocess.py"), "--clips", "3", "--rounds", "1"]
    cmd += ["--workers", "default"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "on cpu" in out and "one-thread lanes" in out  # 128x96x17 clips on the CPU: lanes
    assert re.search(r"VAE alone as the stage runs it [\d.]+ clips/s best", out)
    assert re.search(r"default: encoding stage [\d.]+ clips/s best, [\d.]+ median = \d+ % median \(\d+-\d+ %\)", out)
    assert re.search(
        r"default in a fresh process \(train.py --only preprocess, .*\): encoding stage [\d.]+ clips/s", out
    )
    assert re.search(r"CPU time per clip, one thread: VAE [\d.]+ ms, .* can reach at most \d+ % of the VAE alone", out)
    assert "one latent encoded" in out and "no-op process" in out
    assert re.search(r"encoder off the CPU .* = \d+ % of the limit", out)

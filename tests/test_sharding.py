"""training.sharding: fsdp - FSDP2 over two real CPU processes (gloo) through `accelerate launch`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors import safe_open
from test_faults import _descendants, _wait_for
from test_training import make_cache, make_config

from ltxv_tuner import cache, checkpoints, convert, launch, locks, pipeline, preflight, sharding
from ltxv_tuner.config import ModelConfig, load_config, validate_config
from ltxv_tuner.errors import ConfigError, UserError
from ltxv_tuner.models import ltxv

TWO = {"distributed": True, "num_processes": 2}


def _full(tmp_path: Path, sharding_mode: str, steps: int, buckets=((64, 64, 9),), **training):
    return make_config(
        tmp_path,
        buckets,
        model={"training_mode": "full"},
        training={**TWO, "steps": steps, "sharding": sharding_mode, **training},
        checkpoints={"interval": 2, "auto_convert_to_comfy": False},
    )


def _max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)


def test_sharded_full_fine_tune_matches_data_parallel_and_exports_the_same_files(tmp_path):
    manifest = make_cache(tmp_path / "data", clips_per_bucket=4)
    runs = {}
    for mode in ("fsdp", "none"):
        cfg = _full(tmp_path, mode, 3, gradient_accumulation_steps=2, max_grad_norm=0.05)
        runs[mode] = launch.train(cfg, tmp_path / mode, manifest)
    sharded, plain = (runs[m].checkpoints[-1] for m in ("fsdp", "none"))
    assert runs["fsdp"].final_step == 3 and sharded.name == "ltxv_transformer_step_000003.safetensors"
    # same data, same noise: only the reduction order differs (reduce-scatter of shards vs all-reduce)
    assert _max_relative_difference(cache.load_tensors(sharded), cache.load_tensors(plain)) < 1e-5
    assert runs["fsdp"].final_loss == pytest.approx(runs["none"].final_loss, rel=1e-5)
    state = sharded.parent / "state"
    assert sorted(p.name for p in state.glob("sharded_rank*.safetensors")) == [
        "sharded_rank0.safetensors",
        "sharded_rank1.safetensors",
    ]
    assert not (state / "optimizer.bin").exists() and not (state / "trainable.safetensors").exists()
    # each process saved its own half of every block weight (no gather)
    half = cache.load_tensors(state / "sharded_rank1.safetensors")
    full = cache.load_tensors(sharded)
    name = "transformer_blocks.0.attn1.to_q.weight"
    assert half[f"model/{name}"].shape[0] == full[name].shape[0] // 2
    # the exported files load as model_source and convert exactly like those of a data-parallel run
    files = {"fsdp": sharded, "none": plain}
    loaded = {m: ltxv.load_transformer(ModelConfig(model_source=str(f))) for m, f in files.items()}
    assert loaded["fsdp"].config == loaded["none"].config
    assert _max_relative_difference(loaded["fsdp"].state_dict(), loaded["none"].state_dict()) < 1e-5
    comfy = {m: convert.convert_file(f, tmp_path / f"{m}_comfy.safetensors") for m, f in files.items()}
    with safe_open(str(comfy["fsdp"]), "pt") as a, safe_open(str(comfy["none"]), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and a.metadata().keys() == b.metadata().keys()


# The quickstart clips, sharded over 2 processes, with everything that could make a resume drift: warmup, two
# micro-batches per step, image-to-video draws, clipping, weight decay, bf16 autocast. A constant schedule, so the
# LR does not depend on training.steps (the killed run is started with more steps than it will ever train).
SHARDED_RUN = [
    "model.training_mode=full", "training.distributed=true", "training.num_processes=2", "training.sharding=fsdp",
    "training.scheduler_type=constant", "training.warmup_steps=2", "training.gradient_accumulation_steps=2",
    "training.first_frame_conditioning_p=0.5", "training.max_grad_norm=0.05", "training.weight_decay=0.1",
    "training.mixed_precision_mode=bf16", "checkpoints.interval=2", "checkpoints.auto_convert_to_comfy=false",
]  # fmt: skip


def test_sharded_run_killed_after_a_checkpoint_resumes_bit_identical(tmp_path, quickstart_config, capsys):
    """Issue 16: the top-level train.py of a sharded run is SIGKILLed once checkpoint 2 is written; none of its
    processes survives it, and `--resume latest` ends bit-identical to an uninterrupted run. (The uninterrupted run
    and the resume go through `pipeline.run` in this process, as train.py calls it, to save two interpreter starts.)"""
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def config(*overrides):
        return load_config(quickstart_config, [*SHARDED_RUN, *overrides])

    reference = pipeline.run(config("training.steps=6", f"output_dir={straight}"))  # preprocesses the clips too

    log = (tmp_path / "killed.log").open("w")
    args = [str(quickstart_config), *SHARDED_RUN, "training.steps=100000", f"output_dir={killed}", "--only", "train"]
    top = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], stdout=log, stderr=subprocess.STDOUT)
    family: list[int] = []
    try:
        _wait_for(lambda: list(killed.glob("run_*/checkpoints/step_000002")), "checkpoint 2", timeout=120)
        family = _descendants(top.pid)
        assert len(family) >= 3  # the accelerate launcher and its two workers
        os.kill(top.pid, signal.SIGKILL)
        top.wait()
        _wait_for(lambda: not any(locks.pid_alive(p) for p in family), "the workers to die", timeout=30)
    finally:
        for pid in [top.pid, *family]:
            if locks.pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    (run,) = killed.glob("run_*")
    assert locks.read_holder(run / locks.RUN_LOCK_FILE)["pid"] == top.pid  # left behind: stale, taken over
    last = checkpoints.list_checkpoints(run)[-1][0]
    assert last < 6

    capsys.readouterr()
    assert pipeline.run(config("training.steps=6", f"output_dir={killed}"), resume="latest") == run
    assert f"resuming run {run} from step_{last:06d}" in capsys.readouterr().out
    a, b = checkpoints.checkpoint_dir(reference, 6), checkpoints.checkpoint_dir(run, 6)
    for rel in ("ltxv_transformer_step_000006.safetensors", "state/sharded_rank0.safetensors",
                "state/sharded_rank1.safetensors"):  # fmt: skip
        x, y = cache.load_tensors(a / rel), cache.load_tensors(b / rel)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), rel
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert not (run / locks.RUN_LOCK_FILE).exists()

    # another process count: refused before any process starts, in one line naming both counts
    with pytest.raises(UserError, match=r"sharded over 2 processes but this run has 3.*num_processes=2") as e:
        preflight.check_resume(str(run), killed, config("training.steps=6", "training.num_processes=3"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="training.sharding: 'fsdp' -> 'none'"):
        preflight.check_resume(str(run), killed, config("training.steps=6", "training.sharding=none"))


def test_lora_on_a_sharded_base_exports_the_same_lora_format(tmp_path):
    """The sharded run is launched from an accelerate config file with distributed_type FSDP, with gradient
    checkpointing: both compose with sharding."""
    manifest = make_cache(tmp_path / "data", clips_per_bucket=4)
    acc = tmp_path / "fsdp.yaml"
    acc.write_text("distributed_type: FSDP\nnum_machines: 1\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 2\n")
    sharded = {"accelerate_config": str(acc), "sharding": "fsdp", "enable_gradient_checkpointing": True}
    files = {}
    for mode, training in (("fsdp", sharded), ("none", TWO)):
        cfg = make_config(tmp_path, training={"steps": 2, **training}, checkpoints={"interval": 2})
        files[mode] = launch.train(cfg, tmp_path / mode, manifest).checkpoints[-1]
    a, b = cache.load_tensors(files["fsdp"]), cache.load_tensors(files["none"])
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(k.startswith("transformer.") and ".lora_" in k for k in a)
    assert _max_relative_difference(a, b) < 1e-5
    with safe_open(str(files["fsdp"]), "pt") as f, safe_open(str(files["none"]), "pt") as g:
        assert f.metadata().keys() == g.metadata().keys()
    twins = [convert.convert_file(f, checkpoints.twin_path(f)) for f in files.values()]  # the ComfyUI twins
    assert cache.load_tensors(twins[0]).keys() == cache.load_tensors(twins[1]).keys()


def test_sharding_settings_that_cannot_go_together_are_listed(tmp_path):
    raw = {
        "dataset": {"data_folder": "x"},
        "training": {"sharding": "fsdp", "optimizer_type": "adamw8bit", "mixed_precision_mode": "fp16"},  # 1 process
        "acceleration": {"compile": True},
    }
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    for key in ("training.optimizer_type", "training.mixed_precision_mode", "acceleration.compile"):
        assert f"{key}: not available with training.sharding: fsdp" in str(e.value)
    assert "training.sharding: fsdp shards over several processes: set training.distributed: true" in str(e.value)
    with pytest.raises(ConfigError, match="training.cpu_offload: only used with training.sharding: fsdp"):
        validate_config({"dataset": {"data_folder": "x"}, "training": {"cpu_offload": True}})


def test_accelerate_config_with_fsdp_goes_with_training_sharding(tmp_path):
    acc = tmp_path / "fsdp.yaml"
    acc.write_text("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_offload_params: true\n")
    base = {"dataset": {"data_folder": "x"}, "training": {"accelerate_config": str(acc)}}
    with pytest.raises(UserError, match="distributed_type FSDP; set training.sharding: fsdp"):
        launch.launch_command(validate_config(base), tmp_path, tmp_path / "m.json", None)
    base["training"]["sharding"] = "fsdp"
    with pytest.raises(UserError, match="fsdp_offload_params: True but training.cpu_offload is False"):
        launch.launch_command(validate_config(base), tmp_path, tmp_path / "m.json", None)
    base["training"]["cpu_offload"] = True
    cmd = launch.launch_command(validate_config(base), tmp_path, tmp_path / "m.json", None)
    assert cmd[cmd.index("--config_file") + 1] == str(acc)
    acc.write_text("distributed_type: DEEPSPEED\n")
    with pytest.raises(UserError, match="distributed_type DEEPSPEED, which is not supported"):
        launch.launch_command(validate_config(base), tmp_path, tmp_path / "m.json", None)


def test_one_process_is_refused_for_sharding():
    class OneProcess:
        num_processes = 1

    with pytest.raises(UserError, match="training.sharding: fsdp needs several processes, this run has 1"):
        sharding.shard_transformer(OneProcess(), torch.nn.Linear(2, 2), cpu_offload=False)


def test_preflight_estimate_per_gpu_under_sharding_and_the_advice_for_a_13b_full_fine_tune():
    from ltxv_tuner.models.ltxv import count_params, transformer_config

    tcfg = transformer_config("LTXV_13B_097_DEV")
    n = count_params(tcfg)

    def cfg(**training):
        raw = {
            "dataset": {"data_folder": "x", "resolution_buckets": [[768, 768, 97]]},
            "model": {"training_mode": "full"},
        }
        training = {"enable_gradient_checkpointing": True, "distributed": True, **training}
        return validate_config({**raw, "training": training})

    bucket = [768, 768, 97]
    plain = preflight.estimate_memory(cfg(), tcfg, bucket, n)
    assert 190 < plain.trainable_gib < 200  # 16 bytes per parameter with AdamW
    two, eight = (preflight.estimate_memory(cfg(sharding="fsdp"), tcfg, bucket, n, k) for k in (2, 8))
    assert two.trainable_gib == pytest.approx(plain.trainable_gib / 2) and eight.total_gib < two.total_gib
    assert 0 < eight.gathered_gib < 5 and eight.activations_gib == plain.activations_gib
    offload = preflight.estimate_memory(cfg(sharding="fsdp", cpu_offload=True), tcfg, bucket, n, 8)
    assert offload.trainable_gib == 0 and offload.total_gib < eight.total_gib

    h100 = ("H100", 80 * 1024**3)
    (line,) = preflight.report(cfg(), tcfg, gpu=h100)
    assert "MORE than the 80 GiB of H100: a full fine-tune of this model does not fit one GPU" in line
    assert "training.sharding: fsdp on 4 or more such GPUs (training.num_processes: 4" in line
    (line,) = preflight.report(cfg(sharding="fsdp", distributed=True, num_processes=8), tcfg, gpu=h100)
    assert "sharded over 8 processes" in line and "MORE" not in line


def test_a_sharded_checkpoint_missing_a_process_shard_is_refused_with_the_fix(tmp_path):
    state = tmp_path / "run" / "checkpoints" / "step_000002" / "state"
    state.mkdir(parents=True)
    (state / "training_state.json").write_text(json.dumps({"step": 2, "data_position": 4, "num_processes": 2}))
    for name in ("scheduler.bin", "random_states_0.pkl", "random_states_1.pkl"):  # as accelerate's save_state
        torch.save({}, state / name)
    cache.save_tensors_atomic(sharding.shard_file(state, 0), {"model/w": torch.zeros(2)}, {"num_processes": "2"})
    assert sharding.saved_process_count(state) == 2
    with pytest.raises(UserError, match=r"sharded_rank1.safetensors is damaged or missing.*no earlier checkpoint"):
        checkpoints.check_state_files(state.parent)
    cache.save_tensors_atomic(sharding.shard_file(state, 1), {"model/w": torch.zeros(2)}, {"num_processes": "2"})
    checkpoints.check_state_files(state.parent)

"""convert.py: ComfyUI twins of LoRA and full checkpoints, run conversion, the ltxv-convert CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from ltxv_tuner import convert, export, tiny
from ltxv_tuner.config import validate_config
from ltxv_tuner.errors import UserError

ATTN = ["to_k", "to_q", "to_v", "to_out.0"]


def make_cfg(mode="lora", rank=4, alpha=8, targets=ATTN, dtype="fp32"):
    return validate_config(
        {
            "dataset": {"data_folder": "data", "id_token": "SQUISH", "resolution_buckets": [[64, 64, 9]]},
            "model": {"model_source": "tiny", "training_mode": mode},
            "lora": {"rank": rank, "alpha": alpha, "target_modules": list(targets)},
            "checkpoints": {"save_dtype": dtype},
        }
    )


def lora_transformer(cfg, seed=0):
    t = tiny.build_tiny_transformer()
    t.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a trained LoRA is non-zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return t


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    cfg = make_cfg(rank=4, alpha=8, targets=[*ATTN, "proj_in", "ff.net.0.proj"])
    t = lora_transformer(cfg)
    path = export.save_lora(tmp_path_factory.mktemp("lora"), t, cfg, 5)
    return path, t


def test_lora_to_comfy_keys_names_scale_and_no_alpha(lora_file, tmp_path):
    src, t = lora_file
    dst = convert.convert_file(src, tmp_path / "out_comfy.safetensors")
    tensors, meta = read(dst)
    assert tensors and all(k.startswith("diffusion_model.") for k in tensors)
    assert not any(k.endswith(".alpha") for k in tensors)
    assert "diffusion_model.patchify_proj.lora_A.weight" in tensors  # ComfyUI's name for proj_in
    assert not any(".proj_in." in k for k in tensors)
    assert "diffusion_model.transformer_blocks.1.attn2.to_out.0.lora_B.weight" in tensors
    assert "diffusion_model.transformer_blocks.0.ff.net.0.proj.lora_A.weight" in tensors
    sd = t.state_dict()
    a = sd["transformer_blocks.0.attn1.to_q.lora_A.default.weight"]
    b = sd["transformer_blocks.0.attn1.to_q.lora_B.default.weight"]
    assert torch.equal(tensors["diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight"], a)
    torch.testing.assert_close(tensors["diffusion_model.transformer_blocks.0.attn1.to_q.lora_B.weight"], b * 2.0)
    # metadata carried over, minus the diffusers alpha (now folded into lora_B)
    assert meta["ltxv_tuner.id_token"] == "SQUISH" and meta["ltxv_tuner.alpha"] == "8"
    assert export.LORA_ADAPTER_METADATA_KEY not in meta
    assert meta["ltxv_tuner.key_format"] == "comfy"


def test_default_output_name_and_existing_default_refused(lora_file, tmp_path):
    src = tmp_path / "ltxv_lora_step_000005.safetensors"
    src.write_bytes(lora_file[0].read_bytes())
    dst = convert.convert_file(src)
    assert dst == tmp_path / "ltxv_lora_step_000005_comfy.safetensors"
    with pytest.raises(UserError, match="exists already"):
        convert.convert_file(src)


def test_full_to_comfy_original_names_with_prefix(tmp_path):
    cfg = make_cfg(mode="full")
    t = tiny.build_tiny_transformer()
    src = export.save_full(tmp_path, t, cfg, 1)
    tensors, meta = read(convert.convert_file(src))
    assert all(k.startswith("model.diffusion_model.") for k in tensors)
    sd = t.state_dict()
    assert len(tensors) == len(sd)
    for diffusers_name, original_name in [
        ("proj_in.weight", "patchify_proj.weight"),
        ("time_embed.linear.weight", "adaln_single.linear.weight"),
        ("transformer_blocks.0.attn1.norm_q.weight", "transformer_blocks.0.attn1.q_norm.weight"),
        ("transformer_blocks.1.attn2.norm_k.weight", "transformer_blocks.1.attn2.k_norm.weight"),
        ("transformer_blocks.1.ff.net.2.weight", "transformer_blocks.1.ff.net.2.weight"),
        ("scale_shift_table", "scale_shift_table"),
    ]:
        assert torch.equal(tensors["model.diffusion_model." + original_name], sd[diffusers_name])
    assert meta["ltxv_tuner.training_mode"] == "full"


def _make_run(tmp_path, lora_src):
    run = tmp_path / "run_20250101_000000"
    step = run / "checkpoints" / "step_000005"
    (step / "state").mkdir(parents=True)
    lora = step / lora_src.name
    lora.write_bytes(lora_src.read_bytes())
    # accelerate's save_state writes a model.safetensors of the same LoRA weights: it must never be touched
    state_file = step / "state" / "model.safetensors"
    state_file.write_bytes(lora_src.read_bytes())
    save_file({"x": torch.zeros(2)}, str(step / "state" / "optimizer.safetensors"))
    return run, lora, state_file


def test_convert_run_skips_state_and_existing_twins(lora_file, tmp_path):
    run, lora, state_file = _make_run(tmp_path, lora_file[0])
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "checkpoints").rglob("*") if p.is_file()}
    written = convert.convert_run(run)
    twin = lora.with_name(lora.stem + "_comfy.safetensors")
    assert written == [twin] and twin.is_file()
    assert not list((run / "checkpoints").rglob("state/*_comfy.safetensors"))
    for p, (mtime, data) in before.items():  # sources and state untouched
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    mtime = twin.stat().st_mtime_ns
    assert convert.convert_run(run) == []  # second run writes nothing
    assert twin.stat().st_mtime_ns == mtime
    assert not list((run / "checkpoints").rglob("*_comfy_comfy*"))


def test_convert_run_rewrites_a_twin_older_than_its_source(lora_file, tmp_path):
    run, lora, _ = _make_run(tmp_path, lora_file[0])
    twin = lora.with_name(lora.stem + "_comfy.safetensors")
    twin.write_bytes(b"stale")
    os.utime(twin, (1, 1))
    assert convert.convert_run(run) == [twin]
    assert read(twin)[0]  # a real safetensors file again


def test_convert_run_without_checkpoints_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoints/ folder"):
        convert.convert_run(tmp_path)
    (tmp_path / "checkpoints" / "step_000001" / "state").mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "checkpoints" / "step_000001" / "state" / "model.safetensors"))
    with pytest.raises(UserError, match="no .safetensors weight files"):
        convert.convert_run(tmp_path)


def test_cli_main_converts_and_reports_errors_in_one_line(lora_file, tmp_path, capsys):
    out = tmp_path / "cli_comfy.safetensors"
    assert convert.main([str(lora_file[0]), "--to-comfy", "-o", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert convert.main([str(tmp_path / "missing.safetensors"), "--to-comfy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.safetensors" in err and "\n" not in err and "Traceback" not in err


def test_cli_module_entry_point_runs_a_run_folder(lora_file, tmp_path):
    run, lora, _ = _make_run(tmp_path, lora_file[0])
    proc = subprocess.run(
        [sys.executable, "-m", "ltxv_tuner.convert", str(run), "--to-comfy"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert lora.with_name(lora.stem + "_comfy.safetensors").is_file()

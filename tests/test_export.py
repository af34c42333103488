"""export.py: the files the training stage writes (diffusers LoRA with alpha metadata, full transformer)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from ltxv_tuner import PROJECT_NAME, __version__, export
from ltxv_tuner.config import validate_config
from ltxv_tuner.errors import UserError
from ltxv_tuner.models import ltxv_tiny as tiny

BUCKETS = [[128, 96, 17], [64, 64, 9]]


def make_cfg(mode="lora", rank=4, alpha=8, targets=("to_k", "to_q", "to_v", "to_out.0"), dtype="fp32"):
    return validate_config(
        {
            "dataset": {"data_folder": "data", "id_token": "SQUISH", "resolution_buckets": BUCKETS},
            "model": {"model_source": "tiny", "training_mode": mode},
            "lora": {"rank": rank, "alpha": alpha, "target_modules": list(targets)},
            "training": {"steps": 10},
            "checkpoints": {"save_dtype": dtype},
        }
    )


def lora_transformer(cfg, seed=0):
    t = tiny.build_tiny_transformer()
    t.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: a "trained" LoRA must change the output
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return t


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_save_lora_writes_diffusers_keys_alpha_metadata_and_standard_name(tmp_path):
    cfg = make_cfg(rank=4, alpha=8)
    t = lora_transformer(cfg)
    path = export.save_lora(tmp_path / "step_000250", t, cfg, 250)
    assert path == tmp_path / "step_000250" / "ltxv_lora_step_000250.safetensors"
    tensors, meta = read(path)
    assert tensors and all(k.startswith("transformer.transformer_blocks.") for k in tensors)
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors
    assert "transformer.transformer_blocks.1.attn2.to_out.0.lora_B.weight" in tensors
    assert not any(k.endswith(".alpha") for k in tensors)
    adapter = json.loads(meta[export.LORA_ADAPTER_METADATA_KEY])
    assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 8
    sd = t.state_dict()
    key = "transformer_blocks.0.attn1.to_q.lora_B.default.weight"
    assert torch.equal(tensors["transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"], sd[key])
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*tmp"))


def test_save_lora_from_compiled_wrapper_strips_orig_mod(tmp_path):
    cfg = make_cfg()
    t = lora_transformer(cfg)
    path = export.save_lora(tmp_path / "x.safetensors", torch.compile(t), cfg, 3)
    tensors, _ = read(path)
    assert path.name == "x.safetensors"
    assert tensors and not any("_orig_mod" in k for k in tensors)


def test_save_dtype_bf16(tmp_path):
    cfg = make_cfg(dtype="bf16")
    tensors, _ = read(export.save_lora(tmp_path, lora_transformer(cfg), cfg, 1))
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}


def test_training_metadata_contents():
    cfg = make_cfg(rank=4, alpha=8)
    meta = export.training_metadata(cfg, 250)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ltxv_tuner.base_model"] == "tiny"
    assert meta["ltxv_tuner.training_mode"] == "lora"
    assert meta["ltxv_tuner.rank"] == "4" and meta["ltxv_tuner.alpha"] == "8"
    assert json.loads(meta["ltxv_tuner.target_modules"]) == ["to_k", "to_q", "to_v", "to_out.0"]
    assert meta["ltxv_tuner.id_token"] == "SQUISH" and meta["modelspec.trigger_phrase"] == "SQUISH"
    assert meta["ltxv_tuner.steps"] == "250"
    assert json.loads(meta["ltxv_tuner.resolution_buckets"]) == [[128, 96, 17], [64, 64, 9]]
    assert meta["ltxv_tuner.project"] == PROJECT_NAME and meta["ltxv_tuner.version"] == __version__
    assert meta["modelspec.architecture"] == "ltx-video/lora"
    assert meta["modelspec.sai_model_spec"] and meta["modelspec.title"] and meta["modelspec.date"]
    full = export.training_metadata(make_cfg(mode="full"), 5)
    assert full["modelspec.architecture"] == "ltx-video" and "ltxv_tuner.rank" not in full


def test_save_full_diffusers_names_exact_weights(tmp_path):
    cfg = make_cfg(mode="full")
    t = tiny.build_tiny_transformer()
    path = export.save_full(tmp_path / "step_000007", t, cfg, 7)
    assert path.name == "ltxv_transformer_step_000007.safetensors"
    tensors, meta = read(path)
    sd = t.state_dict()
    assert set(tensors) == set(sd)
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)
    assert meta["ltxv_tuner.training_mode"] == "full"


def test_save_lora_without_adapter_and_full_with_adapter_are_user_errors(tmp_path):
    cfg = make_cfg()
    with pytest.raises(UserError, match="no LoRA adapter"):
        export.save_lora(tmp_path, tiny.build_tiny_transformer(), cfg, 1)
    with pytest.raises(UserError, match="save_lora"):
        export.save_full(tmp_path, lora_transformer(cfg), cfg, 1)

"""Model sources: named LTXV versions (HF download), local single files, diffusers folders, and `tiny`.

Minimal version: only `tiny` so far; the other sources follow (see docs/DESIGN.md for the API).
"""

from __future__ import annotations

import torch

from . import tiny
from .errors import UserError


def _is_tiny(model_cfg) -> bool:
    return model_cfg.model_source.strip().lower() == "tiny"


def _unsupported(model_cfg):
    return UserError(f"model.model_source: {model_cfg.model_source!r} is not supported yet (use `tiny`)")


def load_transformer(model_cfg, dtype=torch.float32, device="cpu"):
    if _is_tiny(model_cfg):
        return tiny.build_tiny_transformer().to(device=device, dtype=dtype)
    raise _unsupported(model_cfg)


def load_vae(model_cfg, dtype=torch.float32, device="cpu"):
    if _is_tiny(model_cfg):
        return tiny.build_tiny_vae().to(device=device, dtype=dtype)
    raise _unsupported(model_cfg)


def load_text_encoder(model_cfg, dtype=torch.float32, device="cpu"):
    if _is_tiny(model_cfg):
        return tiny.build_tiny_tokenizer(), tiny.build_tiny_text_encoder().to(device=device, dtype=dtype)
    raise _unsupported(model_cfg)


def load_scheduler(model_cfg):
    return tiny.build_ltxv_scheduler()


def model_identity(model_cfg) -> dict:
    if _is_tiny(model_cfg):
        return {"transformer": tiny.TINY_IDENTITY, "vae": tiny.TINY_IDENTITY, "text_encoder": tiny.TINY_IDENTITY}
    raise _unsupported(model_cfg)


def base_checkpoint_metadata(model_cfg) -> dict | None:
    return None

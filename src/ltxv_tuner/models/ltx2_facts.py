"""LTX-2 facts that need no torch: the cache-key identities of its components, where its Gemma comes from, and
its audio mode. `ltx2_load.py` and the family module `ltx2.py` re-export them; a preprocessing run that finds its
cache complete asks only this module, so it never imports torch or diffusers."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import sources
from .sources import HF_REVISION, file_identity, folder_identity, versions

TINY_IDENTITY = "tiny-ltx2-v1"
GEMMA3_REPO = "google/gemma-3-12b-it-qat-q4_0-unquantized"  # the text encoder of 2.0 and 2.3
GEMMA_FIX = "set model.text_encoder to a local Gemma folder (config.json, weights and tokenizer files)"


def text_encoder_source(model_cfg) -> tuple[str, Path | None]:
    """('tiny', None) | ('local', folder) | ('hf', None) - where the Gemma comes from."""
    return sources.text_encoder_source(model_cfg, "a local Gemma folder")


def gemma_repo(model_cfg) -> str:
    src = model_cfg.source
    if src.kind != "named":
        return GEMMA3_REPO
    entry = versions()[src.version]
    if "text_encoder_repo" not in entry:
        raise UserError(
            f"model.text_encoder: {src.version} encodes prompts with its own Gemma 4 ({entry['files']['text_encoder']} "
            f"in {src.repo}), which is not loaded from that single file; {GEMMA_FIX}, e.g. the text_encoder/ + "
            "tokenizer/ of Lightricks/LTX-2.5-Diffusers"
        )
    return entry["text_encoder_repo"]


def _component_identity(src, component: str) -> str:
    if src.kind == "diffusers":
        return folder_identity(src.path / component)
    if src.kind == "single_file":
        return f"{file_identity(src.path)}#{component}"
    files = versions()[src.version].get("files") or {}
    return f"hf:{src.repo}/{files.get(component, src.filename)}@{src.revision}#{component}"


def _text_encoder_identity(model_cfg) -> str:
    kind, folder = text_encoder_source(model_cfg)
    if kind == "local":
        return folder_identity(folder)
    return f"hf:{gemma_repo(model_cfg)}@{HF_REVISION}"


def model_identity(model_cfg) -> dict:
    """What the cached files depend on, per component (cache keys; no weights read, nothing downloaded). Text
    features are cached after the aggregate projection, so the text encoder's identity includes the connectors'."""
    src = model_cfg.source
    if src.kind == "tiny":
        return {"transformer": TINY_IDENTITY, "vae": TINY_IDENTITY, "audio_vae": TINY_IDENTITY,
                "text_encoder": TINY_IDENTITY}  # fmt: skip
    projection = _component_identity(src, "connectors")
    return {
        "transformer": _component_identity(src, "transformer"),
        "vae": _component_identity(src, "vae"),
        "audio_vae": _component_identity(src, "audio_vae"),
        "text_encoder": f"{_text_encoder_identity(model_cfg)}+{projection}",
    }


def audio_mode(cfg) -> str:
    """training.audio: auto (audio where the clip has it), on (every clip), off (video only)."""
    return cfg.training.audio

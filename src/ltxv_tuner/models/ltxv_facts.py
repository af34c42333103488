"""LTX-Video 0.9.x facts that need no torch: the cache-key identities of its components, where its T5 comes from,
and its audio mode (none). The family module `ltxv.py` re-exports them; a preprocessing run that finds its cache
complete asks only this module, so it never imports torch or diffusers."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import sources
from .sources import HF_REVISION, ModelSource, existing_path, file_identity, folder_identity, path_identity

HF_REPO = "Lightricks/LTX-Video"
TINY_IDENTITY = "tiny-v2"  # v2: token ids no longer depend on the process


def text_encoder_source(model_cfg) -> tuple[str, Path | None]:
    """('tiny', None) | ('local', folder) | ('hf', None) - where the T5 comes from."""
    return sources.text_encoder_source(model_cfg, "a T5 folder (text_encoder/ + tokenizer/)")


def _hf_identity(src: ModelSource) -> str:
    return f"hf:{src.repo}/{src.filename}@{src.revision}"


def model_identity(model_cfg) -> dict:
    """Cheap identities of the three components (no weights read, nothing downloaded); used in cache keys."""
    src = model_cfg.source
    if src.kind == "tiny":
        ident = {"transformer": TINY_IDENTITY, "vae": TINY_IDENTITY, "text_encoder": TINY_IDENTITY}
    elif src.kind == "named":
        ident = {"transformer": _hf_identity(src), "vae": _hf_identity(src) + "#vae"}
        ident["text_encoder"] = f"hf:{HF_REPO}/text_encoder+tokenizer@{HF_REVISION}"
    elif src.kind == "single_file":
        ident = {"transformer": file_identity(src.path), "vae": file_identity(src.path) + "#vae"}
        ident["text_encoder"] = f"hf:{HF_REPO}/text_encoder+tokenizer@{HF_REVISION}"
    else:
        ident = {"transformer": folder_identity(src.path / "transformer"), "vae": folder_identity(src.path / "vae")}
        kind, folder = text_encoder_source(model_cfg)
        ident["text_encoder"] = (
            f"{folder_identity(folder / 'text_encoder')}+{folder_identity(folder / 'tokenizer')}"
            if kind == "local" and not model_cfg.text_encoder
            else f"hf:{HF_REPO}/text_encoder+tokenizer@{HF_REVISION}"
        )
    if model_cfg.vae:
        ident["vae"] = path_identity(existing_path(model_cfg.vae, "model.vae", "a VAE file or folder"))
    if model_cfg.text_encoder:
        folder = existing_path(model_cfg.text_encoder, "model.text_encoder", "a T5 folder")
        ident["text_encoder"] = folder_identity(folder)
    return ident


def audio_mode(cfg) -> str:
    """LTX-Video 0.9.x has no audio stream: always "off" (training.audio: on is refused)."""
    if cfg.training.audio == "on":
        raise UserError(
            f"training.audio: on: {cfg.model.model_source} is an LTX-Video 0.9.x model, which has no audio; "
            "use training.audio: auto (or off), or an LTX-2 model"
        )
    return "off"

"""Loading LTX-2 components from every source `model.model_source` can name (see `sources.py`).

Components: the transformer (`LTX2VideoTransformer3DModel`), the text connectors with the aggregate projection
(`LTX2TextConnectors`), the video VAE, the audio VAE, the vocoder, the Gemma text encoder + tokenizer, the
scheduler. Cheap facts (identities for cache keys, the transformer config, parameter counts) without weights.
"""

from __future__ import annotations

import torch

from . import ltx2_tiny


def _source(model_cfg):
    return model_cfg.source


def _unsupported(model_cfg, what: str):
    from ..errors import UserError

    src = _source(model_cfg)
    return UserError(f"model.model_source: {src.text}: loading the LTX-2 {what} from a {src.kind} source is not built")


def load_transformer(model_cfg, dtype=torch.float32, device="cpu"):
    if _source(model_cfg).kind == "tiny":
        return ltx2_tiny.build_transformer().to(device=device, dtype=dtype)
    raise _unsupported(model_cfg, "transformer")


def load_connectors(model_cfg, dtype=torch.float32, device="cpu"):
    if _source(model_cfg).kind == "tiny":
        return ltx2_tiny.build_connectors().to(device=device, dtype=dtype)
    raise _unsupported(model_cfg, "text connectors")


def load_vae(model_cfg, dtype=torch.float32, device="cpu"):
    if _source(model_cfg).kind == "tiny":
        return ltx2_tiny.build_video_vae().to(device=device, dtype=dtype)
    raise _unsupported(model_cfg, "video VAE")


def load_audio_vae(model_cfg, dtype=torch.float32, device="cpu"):
    if _source(model_cfg).kind == "tiny":
        return ltx2_tiny.build_audio_vae().to(device=device, dtype=dtype)
    raise _unsupported(model_cfg, "audio VAE")


def load_vocoder(model_cfg, dtype=torch.float32, device="cpu"):
    if _source(model_cfg).kind == "tiny":
        return ltx2_tiny.build_vocoder().to(device=device, dtype=dtype)
    raise _unsupported(model_cfg, "vocoder")


def load_text_encoder(model_cfg, dtype=torch.float32, device="cpu"):
    """(tokenizer, Gemma) - the Gemma returns all hidden states; the aggregate projection is in the connectors."""
    if _source(model_cfg).kind == "tiny":
        return ltx2_tiny.build_tokenizer(), ltx2_tiny.build_text_encoder().to(device=device, dtype=dtype)
    raise _unsupported(model_cfg, "text encoder")


def load_scheduler(model_cfg):
    return ltx2_tiny.build_scheduler()


def model_identity(model_cfg) -> dict:
    """What the cached files depend on, per component (cache keys)."""
    src = _source(model_cfg)
    if src.kind == "tiny":
        ident = ltx2_tiny.TINY_IDENTITY
        return {"transformer": ident, "vae": ident, "audio_vae": ident, "text_encoder": ident}
    raise _unsupported(model_cfg, "identity")


def architecture(model_cfg) -> dict:
    """The transformer config (diffusers names), without reading weights."""
    if _source(model_cfg).kind == "tiny":
        return dict(ltx2_tiny.TRANSFORMER_CONFIG)
    raise _unsupported(model_cfg, "config")


def count_params(tcfg: dict) -> int:
    """Transformer parameters from its config, built on the meta device (no memory)."""
    from diffusers import LTX2VideoTransformer3DModel

    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(**{k: v for k, v in tcfg.items() if not k.startswith("_")})
    return sum(p.numel() for p in model.parameters())


def base_checkpoint_metadata(model_cfg) -> dict | None:
    return None

"""The LTXV 0.9.x model family: where its weights come from, and the few things the stages ask of a family.

Sources (`models/sources.py` resolves `model.model_source` once):
- a named version -> one single file of the Hugging Face repo `Lightricks/LTX-Video`, downloaded once into the
  standard HF cache; the T5 text encoder comes from the same repo's text_encoder/ + tokenizer/;
- a local `*.safetensors` single file in Lightricks' original layout (transformer under
  `model.diffusion_model.`, VAE under `vae.`), or a transformer-only file (original or diffusers names);
- a local diffusers folder (`transformer/`, `vae/`, optionally `text_encoder/`, `tokenizer/`, `scheduler/`);
- `tiny`: the small random LTXV of `ltxv_tiny.py`.

A single file never needs the network: the diffusers configs of every known architecture ship in
`model_configs/`, and the one whose weight names and shapes match the file exactly is used. Weights are
checked before anything is read (names and shapes from the safetensors header), so a file that is not an
LTXV checkpoint, or of an unknown size, fails with one clear line instead of loading half-random weights.

What the stages ask of a family (see `models/__init__.py`): load each component, its cheap identity for cache
keys, encode video to normalised latents and captions to cached text features, pack latents into tokens and
run the training forward, name keys for ComfyUI/original files, build the validation pipeline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from . import hub, ltxv_tiny
from .ltxv_facts import HF_REPO, audio_mode, model_identity  # noqa: F401  (re-exported: the family's facts)
from .ltxv_facts import text_encoder_source as _text_encoder_source
from .ltxv_keys import (
    LIGHTRICKS_TRANSFORMER_FIELDS,
    ORIGINAL_TRANSFORMER_PREFIX,
    original_to_diffusers,
    strip_compile_prefix,
)
from .single_file import (
    Header,
    build_from_state,
    is_aux_key,
    lora_like,
    match,
    not_base_model_error,
    read_header,
    read_tensors,
)
from .sources import (
    MODEL_CONFIGS,
    ModelSource,
    existing_path,
    folder_scheduler,
    lookup_version,
    named_versions,
    text_encoder_dirs,
)
from .sources import versions as _versions

# Where the default T5 text encoder + tokenizer come from (diffusers layout subfolders of the LTXV repo).
TEXT_ENCODER_PATTERNS = ["text_encoder/*", "tokenizer/*"]

# The transformer configs tried for a single file of unknown version, and the VAE configs (0.9.5 covers
# 0.9.6 and 0.9.7: same VAE architecture).
_TRANSFORMER_CONFIG_DIRS = ("ltxv-13b-0.9.7", "ltxv-2b-0.9.5")
_VAE_CONFIG_DIRS = ("ltxv-2b-0.9.5", "ltxv-2b-0.9.1", "ltxv-2b-0.9.0")
# Fields of a Lightricks metadata transformer config that mean the same in diffusers.
_META_TRANSFORMER_FIELDS = LIGHTRICKS_TRANSFORMER_FIELDS


def transformer_config(version_name: str) -> dict:
    """The diffusers transformer config shipped for a named version (e.g. to build the 13B with random weights)."""
    version = lookup_version(version_name)
    if version is None:
        raise UserError(f"unknown LTXV version {version_name!r} (known: {', '.join(named_versions())})")
    cfg = json.loads((MODEL_CONFIGS / _versions()[version]["configs"] / "transformer" / "config.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _single_file_path(src: ModelSource) -> Path:
    if src.kind == "named":
        return hub.hf_file(src.repo, src.filename)
    return src.path


_GIVE_INSTEAD = "an LTXV checkpoint such as ltxv-13b-0.9.7-dev.safetensors, or a named version like LTXV_13B_097_DEV"


def _not_ltxv_error(key: str, path: Path, part: str, shapes: dict) -> UserError:
    return not_base_model_error(key, path, shapes, "LTXV", part, _GIVE_INSTEAD)


# The transformer: names normalised here (keys.py renames), then matched against the shipped configs.

_TRANSFORMER_PREFIXES = (ORIGINAL_TRANSFORMER_PREFIX, "diffusion_model.", "transformer.", "")


def _transformer_names(header: Header) -> dict[str, str]:
    """diffusers name -> name in the file, for the transformer part of a single file (any known naming)."""
    keys = [k for k in header.shapes if not k.startswith("vae.") and not is_aux_key(k)]
    for prefix in _TRANSFORMER_PREFIXES:
        picked = [k for k in keys if k.startswith(prefix)]
        if any(".transformer_blocks." in "." + k[len(prefix) :] for k in picked):
            return {original_to_diffusers(strip_compile_prefix(k[len(prefix) :])): k for k in picked}
    return {}


def _describe_transformer(shapes: dict[str, tuple]) -> str:
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    width = shapes.get("proj_in.weight", (None,))[0]
    return f"{len(blocks)} transformer blocks of width {width}"


def _load_config_dir(config_dir: Path, sub: str) -> dict:
    return json.loads((config_dir / sub / "config.json").read_text(encoding="utf-8"))


def _candidates(sub: str, first: Path | None, dirs: tuple[str, ...], extra: dict | None) -> list[tuple[str, dict]]:
    """(label, config) pairs to try, without duplicates: the version's own first, then the known ones."""
    out: list[tuple[str, dict]] = []
    for d in ([first] if first else []) + [MODEL_CONFIGS / d for d in dirs]:
        cfg = _load_config_dir(d, sub)
        if all(cfg != c for _, c in out):
            out.append((d.name, cfg))
    if extra and all(extra != c for _, c in out):
        out.append(("the file's metadata config", extra))
    return out


def _metadata_transformer_config(header: Header) -> dict | None:
    from ..export import TRANSFORMER_CONFIG_KEY

    own = header.metadata.get(TRANSFORMER_CONFIG_KEY)  # written by export.save_full: the full diffusers config
    if own:
        try:
            config = json.loads(own)
        except json.JSONDecodeError:
            config = None
        if isinstance(config, dict):
            return {**_load_config_dir(MODEL_CONFIGS / "ltxv-2b-0.9.5", "transformer"), **config}
    meta = header.config_section("transformer")
    fields = {k: meta[k] for k in _META_TRANSFORMER_FIELDS if isinstance(meta.get(k), int)}
    if not fields:
        return None
    return {**_load_config_dir(MODEL_CONFIGS / "ltxv-2b-0.9.5", "transformer"), **fields}


def _metadata_vae_config(header: Header) -> dict | None:
    # Lightricks files describe their VAE in their own (CausalVideoAutoencoder) terms, which the shipped configs
    # cover; a file may also carry a diffusers VAE config, which is then used as is.
    meta = header.config_section("vae")
    return dict(meta) if meta.get("_class_name") == "AutoencoderKLLTXVideo" else None


def _match_single_file_transformer(path: Path, config_dir: Path | None):
    """(header, {diffusers name: name in file}, transformer config) from the file's header alone; no weights read."""
    from diffusers import LTXVideoTransformer3DModel

    header = read_header(path)
    names = _transformer_names(header) if not lora_like(header.shapes) else {}
    if not names:
        raise _not_ltxv_error("model.model_source", path, "transformer", header.shapes)
    found = {d: header.shapes[k] for d, k in names.items()}
    candidates = _candidates("transformer", config_dir, _TRANSFORMER_CONFIG_DIRS, _metadata_transformer_config(header))
    label, cfg = match(LTXVideoTransformer3DModel, candidates, found)
    if label is None:
        raise UserError(
            f"model.model_source: the transformer in {path} ({_describe_transformer(found)}) matches no known LTXV "
            f"architecture (13B 0.9.7: 48 blocks of 4096; 2B: 28 blocks of 2048; closest {cfg}); "
            "use a diffusers folder with its own transformer/config.json for other sizes"
        )
    return header, names, cfg


def local_transformer_config(model_cfg) -> dict | None:
    """The transformer config of a local source, checked from file headers only (fast, no weights read), so a
    wrong file fails before any download or encoding. None for `tiny` and named versions (known without files)."""
    src = model_cfg.source
    if src.kind == "diffusers":
        return {k: v for k, v in _load_config_dir(src.path, "transformer").items() if not k.startswith("_")}
    if src.kind == "single_file":
        _, _, cfg = _match_single_file_transformer(_single_file_path(src), src.config_dir)
        return {k: v for k, v in cfg.items() if not k.startswith("_")}
    return None


def _load_single_file_transformer(path: Path, config_dir: Path | None, dtype, device):
    from diffusers import LTXVideoTransformer3DModel

    header, names, cfg = _match_single_file_transformer(path, config_dir)
    tensors = read_tensors(header, list(names.values()), dtype, device)
    state = {d: tensors[k] for d, k in names.items()}
    return build_from_state(LTXVideoTransformer3DModel, cfg, state, dtype, device)


# The VAE: diffusers' own key conversion for Lightricks' layout, checked on meta tensors first.


def _vae_original_keys(header: Header, key: str) -> dict[str, str]:
    """'vae.'-prefixed original name -> name in the file (a standalone VAE file may lack the prefix)."""
    if any(k.startswith("vae.") for k in header.shapes):
        return {k: k for k in header.shapes if k.startswith("vae.") and not is_aux_key(k)}
    if "encoder.conv_in.conv.weight" in header.shapes and "decoder.conv_out.conv.weight" in header.shapes:
        parts = ("encoder", "decoder", "per_channel_statistics")
        return {f"vae.{k}": k for k in header.shapes if k.split(".")[0] in parts and not is_aux_key(k)}
    if _transformer_names(header):
        raise UserError(
            f"{key}: {header.path} holds only a transformer, no VAE; set model.vae to an LTXV VAE (.safetensors file "
            "or diffusers VAE folder), e.g. the single file of the base version it was trained from"
        )
    raise _not_ltxv_error(key, header.path, "VAE", header.shapes)


def _convert_vae_state(state: dict) -> dict:
    """Original (vae.-prefixed) names -> diffusers names; diffusers-named files pass through."""
    from diffusers.loaders.single_file_utils import convert_ltx_vae_checkpoint_to_diffusers

    if any(".resnets." in k for k in state):  # already diffusers names
        return {k.removeprefix("vae."): v for k, v in state.items()}
    if "vae.encoder.conv_out.conv.weight" not in state:
        return {}
    return convert_ltx_vae_checkpoint_to_diffusers(dict(state))


def _load_single_file_vae(path: Path, config_dir: Path | None, dtype, device, key: str = "model.model_source"):
    from diffusers import AutoencoderKLLTXVideo

    header = read_header(path, key)
    if lora_like(header.shapes):
        raise _not_ltxv_error(key, path, "VAE", header.shapes)
    names = _vae_original_keys(header, key)
    meta = {o: torch.empty(header.shapes[k], device="meta") for o, k in names.items()}
    found = {k: tuple(v.shape) for k, v in _convert_vae_state(meta).items()}
    if not found:
        raise _not_ltxv_error(key, path, "VAE", header.shapes)
    candidates = _candidates("vae", config_dir, _VAE_CONFIG_DIRS, _metadata_vae_config(header))
    label, cfg = match(AutoencoderKLLTXVideo, candidates, found)
    if label is None:
        raise UserError(
            f"{key}: the VAE in {path} matches no known LTXV VAE (0.9.0, 0.9.1, 0.9.5+; closest {cfg}); "
            "set model.vae to a diffusers VAE folder for other VAEs"
        )
    tensors = read_tensors(header, list(names.values()), dtype, device)
    state = _convert_vae_state({o: tensors[k] for o, k in names.items()})
    return build_from_state(AutoencoderKLLTXVideo, cfg, state, dtype, device)


# Data parallel training: every trainable weight takes part in every step.
PARAMETERS_MAY_GO_UNUSED = False
# The preset to point at when the memory estimate exceeds the GPU.
LOW_VRAM_CONFIG = "configs/low_vram_24gb.yaml"
# The pipeline validation videos are rendered with (recorded in each video's .txt).
VALIDATION_PIPELINE = "diffusers LTXConditionPipeline"
# IC-LoRA validation: no diffusers pipeline prepends a reference for LTXV, so ic_validation's own sampler renders it.
IC_VALIDATION_PIPELINE = "ltxv_tuner.ic_validation (reference tokens prepended)"
render_ic_validation = None

# --------------------------------------------------------------------------------------------------
# Public loaders


def _diffusers_sub(folder: Path, sub: str, key: str) -> Path:
    if not (folder / sub / "config.json").is_file():
        raise UserError(f"{key}: {folder} has no {sub}/config.json (a diffusers LTXV folder needs {sub}/)")
    return folder


def load_transformer(model_cfg, dtype=torch.float32, device="cpu"):
    src = model_cfg.source
    if src.kind == "tiny":
        return ltxv_tiny.build_tiny_transformer().to(device=device, dtype=dtype)
    if src.kind == "diffusers":
        from diffusers import LTXVideoTransformer3DModel

        model = LTXVideoTransformer3DModel.from_pretrained(
            str(src.path), subfolder="transformer", local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=True
        )
        return model.to(device)
    return _load_single_file_transformer(_single_file_path(src), src.config_dir, dtype, device)


def _load_vae_path(path: Path, dtype, device, key: str, config_dir: Path | None = None):
    from diffusers import AutoencoderKLLTXVideo

    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        if sub is None and not (path / "config.json").is_file():
            raise UserError(f"{key}: {path} has neither vae/config.json nor config.json (not a diffusers VAE folder)")
        model = AutoencoderKLLTXVideo.from_pretrained(
            str(path), subfolder=sub, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=True
        )
        return model.to(device)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{key}: {path} is not a .safetensors file or a diffusers VAE folder")
    return _load_single_file_vae(path, config_dir, dtype, device, key)


def load_vae(model_cfg, dtype=torch.float32, device="cpu"):
    if model_cfg.vae:
        path = existing_path(model_cfg.vae, "model.vae", "a VAE .safetensors file or a diffusers VAE folder")
        return _load_vae_path(path, dtype, device, "model.vae")
    src = model_cfg.source
    if src.kind == "tiny":
        return ltxv_tiny.build_tiny_vae().to(device=device, dtype=dtype)
    if src.kind == "diffusers":
        key = "model.model_source"
        return _load_vae_path(_diffusers_sub(src.path, "vae", key), dtype, device, key)
    return _load_single_file_vae(_single_file_path(src), src.config_dir, dtype, device)


def load_text_encoder(model_cfg, dtype=torch.float32, device="cpu"):
    kind, folder = _text_encoder_source(model_cfg)
    if kind == "tiny":
        return ltxv_tiny.build_tiny_tokenizer(), ltxv_tiny.build_tiny_text_encoder().to(device=device, dtype=dtype)
    key = "model.text_encoder" if model_cfg.text_encoder else "model.model_source"
    if kind == "hf":
        folder = hub.hf_folder(
            HF_REPO,
            TEXT_ENCODER_PATTERNS,
            lambda f: (f / "text_encoder" / "config.json").is_file() and (f / "tokenizer").is_dir(),
            "the T5 text encoder (text_encoder/, tokenizer/)",
            "model.text_encoder",
        )
    tok_dir, enc_dir = text_encoder_dirs(folder, key, "T5")
    from transformers import T5EncoderModel, T5Tokenizer

    try:
        tokenizer = T5Tokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"{key}: cannot load the T5 tokenizer from {tok_dir} ({err})".splitlines()[0]) from None
    encoder = T5EncoderModel.from_pretrained(str(enc_dir), local_files_only=True, dtype=dtype)
    return tokenizer, encoder.to(device).eval()


def load_scheduler(model_cfg):
    return folder_scheduler(model_cfg.source) or build_scheduler()


# --------------------------------------------------------------------------------------------------
# Identities (cache keys) and metadata


def base_checkpoint_metadata(model_cfg) -> dict | None:
    """The safetensors metadata (e.g. Lightricks' "config" JSON) of a single-file base, for exports to carry over."""
    src = model_cfg.source
    if src.kind not in ("named", "single_file"):
        return None
    return dict(read_header(_single_file_path(src)).metadata) or None


# --------------------------------------------------------------------------------------------------
# What the stages ask of the family: architecture, latents, text features, tokens, the training forward

SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION = 32, 8  # every LTXV VAE
# The flow-match scheduler as LTXV ships it (its dynamic shift is also the training noise-level shift).
SCHEDULER_CONFIG = dict(base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096)


def build_scheduler(use_dynamic_shifting: bool = True):
    """LTXPipeline and LTXImageToVideoPipeline use dynamic shifting; LTXConditionPipeline needs it off."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=use_dynamic_shifting, shift_terminal=0.1, **SCHEDULER_CONFIG
    )


def architecture(model_cfg) -> dict:
    """The transformer config without reading weights (a local file's header is checked here, so a wrong file
    fails before any download or encoding)."""
    src = model_cfg.source
    if src.kind == "tiny":
        return dict(ltxv_tiny.TINY_TRANSFORMER_CONFIG)
    if src.kind == "named":
        return transformer_config(src.version)
    return local_transformer_config(model_cfg)


def count_params(tcfg: dict) -> int:
    """Parameters of LTXVideoTransformer3DModel for this config, by arithmetic (no diffusers import, no model built:
    the no-op path stays fast). A test checks it against the model diffusers builds for the tiny, 2B and 13B
    configs."""
    inner = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    patch = tcfg.get("patch_size", 1) ** 2 * tcfg.get("patch_size_t", 1)
    cross, cap = tcfg["cross_attention_dim"], tcfg["caption_channels"]
    bias, out_bias = int(tcfg.get("attention_bias", True)), int(tcfg.get("attention_out_bias", True))

    def linear(i: int, o: int, with_bias: int = 1) -> int:
        return i * o + o * with_bias

    top = linear(tcfg["in_channels"] * patch, inner) + 2 * inner  # proj_in, scale_shift_table
    top += linear(256, inner) + linear(inner, inner) + linear(inner, 6 * inner)  # time_embed (AdaLayerNormSingle)
    top += linear(cap, inner) + linear(inner, inner)  # caption_projection
    top += linear(inner, tcfg["out_channels"] * patch)  # proj_out
    qk_norms = 2 * inner if tcfg.get("qk_norm", "rms_norm_across_heads") else 0
    attn1 = 3 * linear(inner, inner, bias) + linear(inner, inner, out_bias) + qk_norms
    attn2 = linear(inner, inner, bias) + 2 * linear(cross, inner, bias) + linear(inner, inner, out_bias) + qk_norms
    feed_forward = linear(inner, 4 * inner) + linear(4 * inner, inner)
    return top + tcfg["num_layers"] * (attn1 + attn2 + feed_forward + 6 * inner)


def sequence_length(width: int, height: int, frames: int) -> int:
    """Tokens the transformer sees for one clip: (W/32) * (H/32) * ((F-1)/8 + 1)."""
    s, t = SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION
    return (width // s) * (height // s) * ((frames - 1) // t + 1)


def latent_shape(width: int, height: int, frames: int) -> list[int]:
    """[F, H, W] of the latents of a clip of these dims (channels first in the cache: [C, F, H, W])."""
    s, t = SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION
    return [(frames - 1) // t + 1, height // s, width // s]


def _latent_stats(latents: torch.Tensor, vae) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
    std = vae.latents_std.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
    return mean, std


def normalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    mean, std = _latent_stats(latents, vae)
    return (latents - mean) * vae.config.scaling_factor / std


def denormalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    mean, std = _latent_stats(latents, vae)
    return latents * std / vae.config.scaling_factor + mean


def encode_video(vae, pixels: torch.Tensor, posterior: str = "mode", seeds: list[int] | None = None) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1, 1] -> normalised latents [B, 128, F', H', W'] (what the transformer sees).

    posterior "mode": the VAE posterior's mean. "sample": one draw from it, as LTX-Video-Trainer and Lightricks'
    own encoder (ltx_video vae_encode) make latents; each clip's noise comes from its own seed (`seeds`, one per
    clip) on a CPU generator, so the draw does not depend on the device, the batch or the other clips."""
    dist = vae.encode(pixels).latent_dist
    if posterior == "mode":
        return normalize_latents(dist.mode(), vae)
    if seeds is None or len(seeds) != pixels.shape[0]:
        raise ValueError("encode_video: posterior 'sample' needs one seed per clip")
    shape = dist.mean.shape[1:]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    z = dist.mean + dist.std * noise.to(device=dist.mean.device, dtype=dist.mean.dtype)
    return normalize_latents(z, vae)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [1, C, F, H, W] -> uint8 frames [F, H, W, 3] on the CPU (cache previews)."""
    z = denormalize_latents(latents, vae)
    temb = torch.zeros(1, device=z.device, dtype=z.dtype) if vae.config.timestep_conditioning else None
    video = vae.decode(z, temb=temb).sample[0]
    return video.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()


# How T5 sees a caption in each inference the user may run (see `dataset.preprocessing.caption_encoding`):
# diffusers' LTX pipelines (and LTX-Video-Trainer) pad to max_sequence_length and run T5 WITHOUT the attention mask,
# so the pad tokens change the real tokens' features; ComfyUI's LTXV text encoder (comfy/text_encoders/lt.py: pad
# to at least 128, T5 with attention_mask=True) and Lightricks' ltx_video pipeline (pad to 256, T5 with the mask)
# run T5 WITH the mask, so the real tokens' features do not depend on the padding. Both keep the mask for the
# transformer's cross-attention.
CAPTION_ENCODINGS = ("diffusers", "comfyui")


def encode_captions(
    tokenizer, encoder, texts: list[str], max_len: int, device, encoding: str = "diffusers"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds [B, max_len, D], mask [B, max_len]): padded to max_len (truncated beyond it), T5 without the mask
    (`diffusers`: exactly LTXPipeline.encode_prompt) or with it (`comfyui`); the mask is kept for the transformer."""
    if encoding not in CAPTION_ENCODINGS:
        raise ValueError(f"encode_captions: unknown encoding {encoding!r} (use one of {CAPTION_ENCODINGS})")
    tok = tokenizer(
        texts, padding="max_length", max_length=max_len, truncation=True, add_special_tokens=True, return_tensors="pt"
    )
    mask = tok.attention_mask.to(device) if encoding == "comfyui" else None
    return encoder(tok.input_ids.to(device), attention_mask=mask)[0], tok.attention_mask


def caption_token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True).input_ids)


def embedding_width(transformer) -> int:
    """Width of the text features the transformer takes (T5 d_model)."""
    return _unwrap(transformer).config.caption_channels


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, F*H*W, C], the token order of LTXPipeline (patch size 1)."""
    return latents.flatten(2).transpose(1, 2)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def _positions(grid: tuple[int, int, int], fps: torch.Tensor, device) -> torch.Tensor:
    """[B, 3, F*H*W] token positions in the units diffusers' LTX RoPE takes as `video_coords`: frame index x 8/fps,
    row and column x 32 - the same values its own grid gives for num_frames/height/width + the fps scale."""
    f, h, w = grid
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in (f, h, w)]
    ff, hh, ww = (a.flatten() for a in torch.meshgrid(*axes, indexing="ij"))
    scale = (8.0 / fps).to(device=device, dtype=torch.float32)[:, None]
    b = scale.shape[0]
    return torch.stack(
        [ff[None] * scale, (hh * SPATIAL_COMPRESSION).expand(b, -1), (ww * SPATIAL_COMPRESSION).expand(b, -1)], 1
    )


def forward(
    transformer,
    tokens: torch.Tensor,
    timestep: torch.Tensor,
    batch: dict,
    grid: tuple[int, int, int],
    reference_grid: tuple[int, int, int] | None = None,
):
    """The training forward: `tokens` [B, seq, C] (noisy latents, after any prepended reference tokens),
    `timestep` x1000 per sample [B] or per token [B, seq], text features from the batch, positions from the latent
    grid (F, H, W) and the clip's frame rate. Prepended reference tokens (IC-LoRA) take the positions of the
    target's grid, as Lightricks' trainer places them for LTXV 0.9.x. Returns the predicted velocity."""
    dtype = _unwrap(transformer).proj_in.weight.dtype
    b = tokens.shape[0]
    f, h, w = grid
    common = dict(
        hidden_states=tokens.to(dtype),
        encoder_hidden_states=batch["prompt_embeds"].to(dtype),
        timestep=timestep,
        encoder_attention_mask=batch["prompt_attention_mask"],
        return_dict=False,
    )
    if reference_grid is not None:
        coords = _positions(grid, batch["fps"], tokens.device)
        return transformer(**common, video_coords=torch.cat([coords, coords], dim=2))[0]
    fps_scale = (8.0 / batch["fps"]).to(device=tokens.device, dtype=torch.float32).view(b, 1, 1, 1, 1)
    rope_scale = (fps_scale, SPATIAL_COMPRESSION, SPATIAL_COMPRESSION)
    return transformer(**common, num_frames=f, height=h, width=w, rope_interpolation_scale=rope_scale)[0]


def frozen_params(model_cfg) -> int:
    """Weights on the GPU during training besides the transformer: none (T5 and the VAE are not loaded)."""
    return 0


def check_config(cfg) -> None:
    """Settings this family cannot honour, refused before any work."""
    audio_mode(cfg)
    if cfg.dataset.reference_downscale != 1:
        raise UserError(
            f"dataset.reference_downscale: {cfg.dataset.reference_downscale}: {cfg.model.model_source} is an "
            "LTX-Video 0.9.x model, whose IC-LoRAs take the reference at the clip's own size (its reference tokens "
            "sit on the clip's grid); use 1, or an LTX-2 model"
        )


def training_losses(transformer, batch: dict, generator: torch.Generator, cfg, strategy) -> dict[str, torch.Tensor]:
    """One flow-matching forward and its loss: the strategy noises the packed latents (noise levels from the
    sequence-shifted logit-normal), the transformer predicts the velocity."""
    from ..strategies.flow_matching import flow_matching_loss

    latents = batch["latents"]
    _, _, f, h, w = latents.shape
    x0 = pack_latents(latents.float())
    ref = batch.get("reference_latents")
    reference = pack_latents(ref.float()) if ref is not None else None
    inputs = strategy.prepare(x0, h * w, scheduler_shift(f * h * w), generator, cfg.training, reference)
    reference_grid = tuple(ref.shape[2:]) if inputs.prepended else None
    pred = forward(transformer, inputs.tokens, inputs.timestep, batch, (f, h, w), reference_grid)
    return {"loss": flow_matching_loss(strategy.prediction_for_loss(pred, inputs), inputs.target, inputs.loss_mask)}


def scheduler_shift(seq_len: int) -> float:
    """Mean of the training noise-level distribution for `seq_len` tokens: the scheduler's dynamic shift, linear
    from base_shift at base_image_seq_len to max_shift at max_image_seq_len (0.95 at 1024 -> 2.05 at 4096)."""
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    c = SCHEDULER_CONFIG
    return calculate_shift(seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])


# --------------------------------------------------------------------------------------------------
# Inference as Lightricks recommends it per kind of checkpoint (validation renders with these)

# The distilled 0.9.7/0.9.8 checkpoints' fixed noise levels (LTX-Video configs/ltxv-*-0.9.8-distilled.yaml,
# first_pass.timesteps), sampled without guidance.
DISTILLED_SIGMAS = (1.0, 0.9937, 0.9875, 0.9812, 0.975, 0.9094, 0.725)
# Every LTX-Video 0.9.x config decodes with decode_timestep 0.05 and decode_noise_scale 0.025 (VAEs without timestep
# conditioning, 0.9.0, ignore both).
_DECODE = {"decode_timestep": 0.05, "decode_noise_scale": 0.025}
INFERENCE = {
    # dev: Lightricks' 2B configs use guidance 3 (13B: 1-8 over the steps, with STG, which diffusers' pipelines lack)
    # and 30-40 steps; 20 (ComfyUI's LTXVScheduler default) keeps validation fast. "shifted" = the resolution-shifted
    # schedule ending at 0.1 that diffusers' LTXPipeline and ComfyUI's LTXVScheduler (default settings) both produce.
    "dev": {"schedule": "shifted", "inference_steps": 20, "guidance_scale": 3.0, **_DECODE},
    "distilled": {"schedule": list(DISTILLED_SIGMAS), "inference_steps": 7, "guidance_scale": 1.0, **_DECODE},
    # 2B 0.9.6 distilled: 8 steps, guidance 1 (its sampler comes from the checkpoint; the shifted one is used here)
    "distilled_096": {"schedule": "shifted", "inference_steps": 8, "guidance_scale": 1.0, **_DECODE},
}
# Not per version: the frame rate ComfyUI's LTXVConditioning and diffusers' LTX pipelines default to, and the noise
# Lightricks' inference and diffusers add to an image condition.
INFERENCE_COMMON = {"frame_rate": 25.0, "image_cond_noise_scale": 0.15}


def inference_kind(model_cfg) -> str:
    """dev, distilled or distilled_096: from versions.json for a named version; for a local file or folder from
    its name (`distilled` in it), else dev."""
    src = model_cfg.source
    if src.kind == "named":
        return _versions()[src.version].get("inference", "dev")
    name = src.path.name.lower() if src.path is not None else ""
    if "distilled" not in name:
        return "dev"
    return "distilled_096" if "0.9.6" in name else "distilled"


def inference_settings(model_cfg) -> dict:
    """Lightricks' recommended inference settings for this model: kind, schedule ("shifted" or a list of noise
    levels), inference_steps, guidance_scale, decode_timestep, decode_noise_scale, frame_rate,
    image_cond_noise_scale."""
    kind = inference_kind(model_cfg)
    return {"kind": kind, **INFERENCE[kind], **INFERENCE_COMMON}


def validation_sigmas(model_cfg, schedule, steps: int, seq_len: int) -> list[float]:
    """The noise levels to sample at (1.0 first, the final 0 implied): a given list as is, or "shifted" - the
    scheduler's resolution-dependent shift of `steps` evenly spaced levels, stretched to end at its terminal (what
    LTXPipeline computes for `seq_len` latent tokens)."""
    if schedule != "shifted":
        return [float(s) for s in schedule]
    import numpy as np
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    scheduler = load_scheduler(model_cfg)
    c = scheduler.config
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
    return scheduler.sigmas[:-1].tolist()


def validation_pipeline(model_cfg, transformer, vae, tokenizer, text_encoder):
    """diffusers' LTXConditionPipeline around the transformer being trained: text-to-video without conditions,
    image-to-video with an image at frame 0. Its scheduler applies no shift of its own: the pipeline is given the
    exact noise levels (`validation_sigmas` x 1000) as timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXConditionPipeline
    from diffusers.video_processor import VideoProcessor

    pipe = LTXConditionPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )  # fmt: skip
    # Every LTXV VAE compresses 32x in space and 8x in time. diffusers derives the ratios from the VAE config
    # (patch_size x 2^scaling stages), which over-counts for the 0.9.5-style blocks of small test VAEs.
    pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio = SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION
    pipe.video_processor = VideoProcessor(vae_scale_factor=SPATIAL_COMPRESSION)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def _quiet_scheduler():
    """The scheduler warns that timesteps come without sigmas; here they are the exact sigmas x 1000, by design."""
    logger = logging.getLogger("diffusers.schedulers.scheduling_flow_match_euler_discrete")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def render_validation(pipe, cfg, s: dict, texts: dict, image, generator):
    """(one video [F, H, W, 3] floats in [0, 1], no audio, None). `texts`: `validation_texts` of the prompt."""
    width, height, frames = cfg.validation.video_dims
    kwargs = {"image": image, "frame_index": 0, "strength": 1.0} if image is not None else {}
    if "negative" in texts:
        kwargs |= {
            "negative_prompt_embeds": texts["negative"][0],
            "negative_prompt_attention_mask": texts["negative"][1],
        }
    with _quiet_scheduler():
        video = pipe(
            prompt_embeds=texts["prompt"][0], prompt_attention_mask=texts["prompt"][1],
            width=width, height=height, num_frames=frames, frame_rate=s["frame_rate"],
            timesteps=[x * 1000.0 for x in s["sigmas"]], guidance_scale=s["guidance_scale"],
            decode_timestep=s["decode_timestep"], decode_noise_scale=s["decode_noise_scale"],
            image_cond_noise_scale=s["image_cond_noise_scale"], generator=generator, output_type="np", **kwargs,
        ).frames  # fmt: skip
    return np.asarray(video[0], dtype=np.float32), None, None


def validation_texts(cfg, s: dict, tokenizer, text_encoder, prompt: str, device) -> dict:
    """The prompt (and, with guidance, the negative prompt) as the training cache encodes captions."""
    texts = {"prompt": prompt}
    if s["guidance_scale"] > 1.0:
        texts["negative"] = cfg.validation.negative_prompt
    out = {}
    for key, text in texts.items():
        emb, mask = encode_captions(
            tokenizer, text_encoder, [text], s["max_text_length"], device, s["caption_encoding"]
        )
        out[key] = (emb, mask.to(device))
    return out

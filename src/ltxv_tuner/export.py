"""Weight files the training stage writes: the diffusers-format LoRA, the full transformer, their metadata.

The layout is fixed in docs/DESIGN.md:
    checkpoints/step_000250/ltxv_lora_step_000250.safetensors         (LoRA, diffusers keys, alpha in metadata)
    checkpoints/step_000250/ltxv_transformer_step_000250.safetensors  (full fine-tune, diffusers names)
`convert.py` turns either into its ComfyUI twin (the family's key names: `models/<family>_keys.py`). Files are written
to a temp name and renamed, so a killed run never leaves half a weight file under the final name. The family goes into
the metadata (`ltxv_tuner.family`), so a converter knows it even for a LoRA whose module names two families share.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from . import PROJECT_NAME, __version__
from .cache import atomic_write
from .checkpoints import weights_file_name
from .errors import UserError
from .models import FAMILY_METADATA_KEY, family_keys
from .models import ltxv_keys as keys

SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# diffusers reads the LoRA's alpha/rank from this metadata key (a JSON dict with keys "transformer.<field>").
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# IC-LoRA: how many times smaller than the generated video the reference is encoded (inference reads it).
REFERENCE_DOWNSCALE_KEY = "reference_downscale_factor"
META_PREFIX = "ltxv_tuner."
FAMILY_KEY = FAMILY_METADATA_KEY  # the model family (models/<family>.py) a weight file belongs to
MODELSPEC_ARCHITECTURE = keys.MODELSPEC_ARCHITECTURE  # LTXV's; each family's keys module has its own
IMPLEMENTATION_DIFFUSERS = "diffusers"
IMPLEMENTATION_ORIGINAL = keys.IMPLEMENTATION_ORIGINAL


def _target(path: str | Path, default_name: str) -> Path:
    """`path` is either the file to write or the folder that gets the standard file name."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / default_name


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomic write: temp file in the same folder, then os.replace."""
    path = Path(path)
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata values must be str, got {bad}")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    try:  # same temp-file/mode/rename mechanism as the cache: ComfyUI may run as another user
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    except (OSError, SafetensorError) as e:  # no permission, a file where a folder should be, disk full
        raise UserError(f"{path}: cannot write it ({e}); pick a writable folder with free space") from e
    return path


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer inside DDP/FSDP and torch.compile wrappers."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def _to_save(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=dtype if t.is_floating_point() else t.dtype).contiguous()


def save_dtype(cfg) -> torch.dtype:
    return SAVE_DTYPES[cfg.checkpoints.save_dtype]


def training_metadata(cfg, step: int) -> dict[str, str]:
    """Metadata stored in every exported file: what was trained, on what, by which tool (all values str)."""
    lora = cfg.model.training_mode == "lora"
    model_family = cfg.model.source.family
    buckets = [list(b) for b in cfg.dataset.resolution_buckets]
    w, h, _ = buckets[0]
    title = f"{PROJECT_NAME} {'LoRA' if lora else 'fine-tune'} step {step}"
    if cfg.dataset.id_token:
        title += f" ({cfg.dataset.id_token})"
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family_keys(model_family).MODELSPEC_ARCHITECTURE + ("/lora" if lora else ""),
        "modelspec.implementation": IMPLEMENTATION_DIFFUSERS,
        "modelspec.title": title,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "modelspec.resolution": f"{w}x{h}",
        f"{META_PREFIX}project": PROJECT_NAME,
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}base_model": str(cfg.model.model_source),
        FAMILY_KEY: model_family,
        f"{META_PREFIX}training_mode": cfg.model.training_mode,
        f"{META_PREFIX}strategy": cfg.training.strategy,
        f"{META_PREFIX}steps": str(step),
        f"{META_PREFIX}total_steps": str(cfg.training.steps),
        f"{META_PREFIX}learning_rate": str(cfg.training.learning_rate),
        f"{META_PREFIX}resolution_buckets": json.dumps(buckets),
        f"{META_PREFIX}id_token": cfg.dataset.id_token or "",
    }
    if cfg.dataset.id_token:
        meta["modelspec.trigger_phrase"] = cfg.dataset.id_token
    if cfg.training.strategy == "ic_lora":
        # Read by ComfyUI-LTXVideo's LTXICLoRALoaderModelOnly and Lightricks' ltx-pipelines (what ltx-trainer writes):
        # the size ratio between the clip and its reference, as a string ("1", "2").
        meta[REFERENCE_DOWNSCALE_KEY] = str(cfg.dataset.reference_downscale)
    if lora:
        meta |= {
            f"{META_PREFIX}rank": str(cfg.lora.rank),
            f"{META_PREFIX}alpha": _num(cfg.lora.alpha),
            f"{META_PREFIX}target_modules": json.dumps(list(cfg.lora.target_modules)),
            # kohya-style keys some UIs show
            "ss_network_dim": str(cfg.lora.rank),
            "ss_network_alpha": _num(cfg.lora.alpha),
        }
    return meta


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _adapter_name(model: torch.nn.Module) -> str:
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise UserError(
            "export.save_lora: the transformer has no LoRA adapter (call transformer.add_adapter(LoraConfig(...)) "
            "first, or use save_full for model.training_mode: full)"
        )
    return "default" if "default" in configs else next(iter(configs))


def lora_adapter_metadata(peft_config) -> str:
    """The JSON diffusers' `load_lora_weights` reads back (`LTXPipeline.save_lora_weights` writes the same)."""
    cfg = peft_config.to_dict()
    packed = {f"{keys.DIFFUSERS_LORA_PREFIX}{k}": (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    return json.dumps(packed, indent=2, sort_keys=True, default=str)


def lora_state_dict(
    transformer: torch.nn.Module, dtype: torch.dtype = torch.float32, state_dict: dict | None = None
) -> dict[str, torch.Tensor]:
    """Diffusers-format LoRA tensors: `transformer.<module>.lora_A.weight` / `.lora_B.weight`.
    `state_dict`: the model's tensors already gathered from a sharded model (default: the model's own)."""
    from peft.utils import get_peft_model_state_dict

    model = unwrap_model(transformer)
    name = _adapter_name(model)
    sd = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=name)
    out = {}
    for k, v in sd.items():
        out[keys.DIFFUSERS_LORA_PREFIX + keys.strip_compile_prefix(k)] = _to_save(v, dtype)
    return out


def save_lora(path: str | Path, transformer: torch.nn.Module, cfg, step: int, state_dict: dict | None = None) -> Path:
    """Write the diffusers-format LoRA (alpha in metadata) to `path` (a .safetensors file, or a folder).
    `state_dict`: the tensors gathered from a sharded model (`sharding.gather_state_dict`)."""
    target = _target(path, weights_file_name("lora", step))
    model = unwrap_model(transformer)
    tensors = lora_state_dict(model, save_dtype(cfg), state_dict)
    if not tensors:
        raise UserError(
            f"export.save_lora: the adapter has no LoRA weights (check lora.target_modules: {cfg.lora.target_modules})"
        )
    meta = {"format": "pt", **training_metadata(cfg, step)}
    meta[LORA_ADAPTER_METADATA_KEY] = lora_adapter_metadata(model.peft_config[_adapter_name(model)])
    meta[f"{META_PREFIX}key_format"] = "diffusers"
    return write_safetensors(target, tensors, meta)


def full_state_dict(
    transformer: torch.nn.Module, dtype: torch.dtype = torch.float32, state_dict: dict | None = None
) -> dict[str, torch.Tensor]:
    """The transformer's weights with diffusers names, no prefix, `_orig_mod.` stripped.
    `state_dict`: the tensors gathered from a sharded model (default: the model's own)."""
    model = unwrap_model(transformer)
    if getattr(model, "peft_config", None):
        raise UserError("export.save_full: the transformer carries a LoRA adapter; use save_lora for LoRA training")
    sd = model.state_dict() if state_dict is None else state_dict
    return {keys.strip_compile_prefix(k): _to_save(v, dtype) for k, v in sd.items()}


TRANSFORMER_CONFIG_KEY = f"{META_PREFIX}transformer_config"


def save_full(path: str | Path, transformer: torch.nn.Module, cfg, step: int, state_dict: dict | None = None) -> Path:
    """Write the full fine-tuned transformer (diffusers names) to `path` (a .safetensors file, or a folder).
    `state_dict`: the tensors gathered from a sharded model (`sharding.gather_state_dict`)."""
    target = _target(path, weights_file_name("full", step))
    tensors = full_state_dict(transformer, save_dtype(cfg), state_dict)
    meta = {"format": "pt", **training_metadata(cfg, step), f"{META_PREFIX}key_format": "diffusers"}
    # The architecture travels with the weights, so the file loads as a model_source whatever its size (the
    # shipped configs cover only the released 13B/2B). Own key: a base file's Lightricks "config" stays intact.
    config = {k: v for k, v in dict(unwrap_model(transformer).config).items() if not k.startswith("_")}
    meta[TRANSFORMER_CONFIG_KEY] = json.dumps(config, sort_keys=True, default=list)
    return write_safetensors(target, tensors, meta)

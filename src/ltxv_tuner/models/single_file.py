"""Reading safetensors single files: header first (names, shapes, metadata), weights only once they fit.

Shared by every model family: a family maps the file's names to diffusers names and picks the config whose
expected names and shapes match the header exactly; only then are the tensors read, each straight to its
device and dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError


@dataclass
class Header:
    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype names: F32, BF16, F8_E4M3, ...
    metadata: dict[str, str]

    def config_section(self, name: str) -> dict:
        try:
            cfg = json.loads(self.metadata.get("config", "{}"))
        except json.JSONDecodeError:
            return {}
        section = cfg.get(name) if isinstance(cfg, dict) else None
        return section if isinstance(section, dict) else {}


def read_header(path: Path, key: str = "model.model_source") -> Header:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: tuple(sl.get_shape()) for k, sl in slices.items()}
            dtypes = {k: str(sl.get_dtype()) for k, sl in slices.items()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{key}: {path} is not a readable .safetensors file ({err})") from None
    return Header(path=path, shapes=shapes, dtypes=dtypes, metadata=metadata)


# Per-tensor scales of "scaled fp8" files (ComfyUI: <module>.scale_weight, diffusers/torchao: <module>.weight_scale);
# input scales are activation hints for fp8 matmuls and mean nothing once the weight is dequantised.
_WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROPPED_SUFFIXES = (".scale_input", ".input_scale")


def _scale_key(header: Header, weight_key: str) -> str | None:
    if not weight_key.endswith(".weight"):
        return None
    module = weight_key.removesuffix(".weight")
    return next((module + s for s in _WEIGHT_SCALE_SUFFIXES if module + s in header.shapes), None)


def is_aux_key(key: str) -> bool:
    return key.endswith(_WEIGHT_SCALE_SUFFIXES + _DROPPED_SUFFIXES)


def read_tensors(header: Header, names: list[str], dtype, device) -> dict[str, torch.Tensor]:
    """Read only `names`, straight onto `device`, each cast to `dtype` as it is read (so the file's and the
    model's copies of a 13B never sit in memory together). fp8 weights with a scale are dequantised first."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(header.path), framework="pt", device=str(device)) as f:
        for k in names:
            t = f.get_tensor(k)
            if (sk := _scale_key(header, k)) is not None:
                scale = f.get_tensor(sk).float()
                if scale.numel() > 1 and t.ndim > 1:  # per output channel
                    scale = scale.reshape(-1, *([1] * (t.ndim - 1)))
                t = t.float() * scale
            out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


def lora_like(keys) -> bool:
    return any("lora_" in k or ".lora." in k or k.startswith("lora_unet") for k in keys)


def not_base_model_error(key: str, path: Path, shapes: dict, family: str, part: str, instead: str) -> UserError:
    """The one-line answer to a local file that is not `family`'s base model: a LoRA given as the base, or other
    weights (a few of their names shown). `instead`: what to give."""
    if lora_like(shapes):
        return UserError(
            f"{key}: {path} is a LoRA file, not a base model (set model.model_source to the {family} base checkpoint; "
            "a LoRA cannot be the starting point)"
        )
    sample = ", ".join(sorted(shapes)[:3]) or "no tensors"
    return UserError(f"{key}: {path} holds no {family} {part} weights (found e.g. {sample}); give {instead}")


def _expected_state(cls, config: dict) -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        model = cls.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _mismatch(expected: dict, found: dict) -> tuple[list[str], list[str], list[str]]:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    return missing, unexpected, wrong


def mismatch_text(missing, unexpected, wrong) -> str:
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            parts.append(f"{len(names)} {label} (e.g. {names[0]})")
    return ", ".join(parts)


def build_from_state(cls, config: dict, state: dict, dtype, device):
    """The model of `config` holding `state` (already diffusers-named, already of `dtype`): built on the meta
    device, then the tensors are assigned as they are (no copy, no random init of weights about to be replaced)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise UserError(f"{cls.__name__}: the weights do not fit ({str(err).splitlines()[0]})") from None
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise UserError(f"{cls.__name__}: {len(left)} weights were not loaded (e.g. {left[0]}); the file does not fit")
    return model.to(dtype).to(device).eval()


def match(cls, candidates, found_shapes) -> tuple[str, dict] | tuple[None, str]:
    first_problem = ""
    for label, cfg in candidates:
        problems = _mismatch(_expected_state(cls, cfg), found_shapes)
        if not any(problems):
            return label, cfg
        first_problem = first_problem or f"{label}: {mismatch_text(*problems)}"
    return None, first_problem

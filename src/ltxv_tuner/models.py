"""Model sources: named LTXV versions (HF download), local single files, diffusers folders, and `tiny`.

`model.model_source` is resolved once into a `ModelSource`:
- a named version (`LTXV_13B_097_DEV`, ...; case, `_`, `.` and `-` do not matter) -> one single file of the
  Hugging Face repo `Lightricks/LTX-Video`, downloaded once into the standard HF cache;
- a local `*.safetensors` single file in Lightricks' original layout (transformer under
  `model.diffusion_model.`, VAE under `vae.`), or a transformer-only file (original or diffusers names);
- a local diffusers folder (`transformer/`, `vae/`, optionally `text_encoder/`, `tokenizer/`, `scheduler/`);
- `tiny`: the small random LTXV of `tiny.py`.

A single file never needs the network: the diffusers configs of every known architecture ship in
`model_configs/`, and the one whose weight names and shapes match the file exactly is used. Weights are
checked before anything is read (names and shapes from the safetensors header), so a file that is not an
LTXV checkpoint, or of an unknown size, fails with one clear line instead of loading half-random weights.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from . import tiny
from .errors import UserError
from .keys import ORIGINAL_TRANSFORMER_PREFIX, original_to_diffusers, strip_compile_prefix

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
HF_REPO = "Lightricks/LTX-Video"
HF_REVISION = "main"
# Where the default T5 text encoder + tokenizer come from (diffusers layout subfolders of the LTXV repo).
TEXT_ENCODER_PATTERNS = ["text_encoder/*", "tokenizer/*"]
HUB_TIMEOUT_S = 10.0

# The transformer configs tried for a single file of unknown version, and the VAE configs (0.9.5 covers
# 0.9.6 and 0.9.7: same VAE architecture).
_TRANSFORMER_CONFIG_DIRS = ("ltxv-13b-0.9.7", "ltxv-2b-0.9.5")
_VAE_CONFIG_DIRS = ("ltxv-2b-0.9.5", "ltxv-2b-0.9.1", "ltxv-2b-0.9.0")
# Fields of a Lightricks metadata transformer config that mean the same in diffusers.
_META_TRANSFORMER_FIELDS = (
    "in_channels",
    "out_channels",
    "num_attention_heads",
    "attention_head_dim",
    "cross_attention_dim",
    "num_layers",
    "caption_channels",
)


# --------------------------------------------------------------------------------------------------
# Resolving model_source


@dataclass(frozen=True)
class ModelSource:
    """What `model.model_source` names. `path` is set for local sources; named versions carry repo/filename."""

    kind: str  # "tiny" | "named" | "single_file" | "diffusers"
    text: str  # the model_source string as given
    version: str | None = None  # canonical named version, e.g. LTXV_13B_097_DEV
    repo: str | None = None
    filename: str | None = None
    revision: str | None = None
    path: Path | None = None
    config_dir: Path | None = None  # shipped diffusers configs of a named version


@cache
def _versions() -> dict[str, dict]:
    return json.loads((MODEL_CONFIGS / "versions.json").read_text(encoding="utf-8"))["versions"]


def _norm_name(name: str) -> str:
    return re.sub(r"[^0-9A-Z]", "", name.upper())


def named_versions() -> list[str]:
    return list(_versions())


def _lookup_version(text: str) -> str | None:
    wanted = _norm_name(text)
    for name in _versions():
        if _norm_name(name) == wanted:
            return name
    return None


def transformer_config(version_name: str) -> dict:
    """The diffusers transformer config shipped for a named version (e.g. to build the 13B with random weights)."""
    version = _lookup_version(version_name)
    if version is None:
        raise UserError(f"unknown LTXV version {version_name!r} (known: {', '.join(named_versions())})")
    cfg = json.loads((MODEL_CONFIGS / _versions()[version]["configs"] / "transformer" / "config.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _looks_like_path(text: str) -> bool:
    return any(c in text for c in "/\\~") or text.startswith(".") or text.lower().endswith(".safetensors")


def _missing_path_error(key: str, path: Path, what: str) -> UserError:
    return UserError(f"{key}: {path} does not exist (give the path to {what})")


def _resolve_text(text: str) -> ModelSource:
    text = text.strip()
    if text.lower() == "tiny":
        return ModelSource(kind="tiny", text=text)
    version = _lookup_version(text)
    if version is not None:
        entry = _versions()[version]
        return ModelSource(
            kind="named",
            text=text,
            version=version,
            repo=entry["repo"],
            filename=entry["filename"],
            revision=HF_REVISION,
            config_dir=MODEL_CONFIGS / entry["configs"],
        )
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "transformer" / "config.json").is_file():
            raise UserError(
                f"model.model_source: folder {path} is not a diffusers LTXV folder (no transformer/config.json); "
                "give a folder with transformer/ and vae/ subfolders, or a single .safetensors file"
            )
        return ModelSource(kind="diffusers", text=text, path=path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UserError(
                f"model.model_source: {path} is not a .safetensors file (only safetensors single files are read; "
                "pickled .ckpt/.pt/.bin files are not loaded for safety)"
            )
        return ModelSource(kind="single_file", text=text, path=path.resolve())
    if _looks_like_path(text):
        raise _missing_path_error("model.model_source", path, "an LTXV .safetensors file or a diffusers folder")
    close = difflib.get_close_matches(text.upper(), named_versions(), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UserError(
        f"model.model_source: unknown model {text!r} ({hint}use one of {', '.join(named_versions())}, "
        "a local .safetensors file, a diffusers folder, or tiny)"
    )


def resolve_model_source(model_cfg) -> ModelSource:
    """Describe `model.model_source` (no download, no weights read). Raises UserError for unknown names/paths."""
    return _resolve_text(model_cfg.model_source)


# --------------------------------------------------------------------------------------------------
# Hugging Face hub access: cache first, one quick probe, then download; one clear error line otherwise


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hf_offline() -> bool:
    # Read the environment at call time: huggingface_hub freezes its constants at import.
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _hf_cache_dir() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_endpoint() -> str | None:
    # HF_ENDPOINT (a mirror) is honoured even when set after huggingface_hub was imported.
    return os.environ.get("HF_ENDPOINT") or None


def _is_network_error(err: Exception) -> bool:
    mod = type(err).__module__.split(".")[0]
    return isinstance(err, OSError) or mod in ("httpx", "httpx2", "httpcore", "requests", "urllib3", "huggingface_hub")


def _hub_error(repo: str, what: str, reason: str, key: str = "model.model_source") -> UserError:
    fix = (
        "set model.text_encoder to a local folder with text_encoder/ + tokenizer/ (or a T5 folder)"
        if key == "model.text_encoder"
        else "point model.model_source at a local .safetensors file or diffusers folder"
    )
    return UserError(
        f"{key}: cannot get {what} from the Hugging Face repo {repo} ({reason}); run once with network access "
        f"to download it into the HF cache ({_hf_cache_dir()}), or {fix}"
    )


def _probe_hub(repo: str, filename: str, what: str, key: str = "model.model_source") -> None:
    """One HEAD request without retries, so a machine without network fails in seconds, not minutes."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        url = hf_hub_url(repo, filename, revision=HF_REVISION, endpoint=_hf_endpoint())
        get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)
    except Exception as err:
        if not _is_network_error(err):
            raise
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            reason = f"access denied (HTTP {status}): log in with `hf auth login` or set HF_TOKEN"
        elif status == 404:
            reason = "file not found in the repo (HTTP 404)"
        else:
            reason = f"no connection: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip()
        raise _hub_error(repo, what, reason, key) from None


def _hf_file(repo: str, filename: str) -> Path:
    """The local path of one repo file: from the HF cache, downloading it once if needed."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cache_dir = _hf_cache_dir()
    cached = try_to_load_from_cache(repo, filename, cache_dir=str(cache_dir), revision=HF_REVISION)
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached)
    if _hf_offline():
        raise _hub_error(repo, filename, "HF_HUB_OFFLINE is set and the file is not in the HF cache")
    _probe_hub(repo, filename, filename)
    try:
        return Path(
            hf_hub_download(repo, filename, revision=HF_REVISION, cache_dir=str(cache_dir), endpoint=_hf_endpoint())
        )
    except Exception as err:
        if not _is_network_error(err):
            raise
        raise _hub_error(repo, filename, f"{type(err).__name__}: {err}".splitlines()[0]) from None


def _hf_text_encoder_folder(repo: str = HF_REPO) -> Path:
    """The LTXV repo's text_encoder/ + tokenizer/ (only those files), from the cache or downloaded once."""
    from huggingface_hub import snapshot_download

    cache_dir = str(_hf_cache_dir())
    kwargs = dict(allow_patterns=TEXT_ENCODER_PATTERNS, revision=HF_REVISION, cache_dir=cache_dir)
    what, key = "the T5 text encoder (text_encoder/, tokenizer/)", "model.text_encoder"
    try:
        folder = Path(snapshot_download(repo, local_files_only=True, **kwargs))
        if (folder / "text_encoder" / "config.json").is_file() and (folder / "tokenizer").is_dir():
            return folder
    except Exception as err:
        if not _is_network_error(err):
            raise
    if _hf_offline():
        raise _hub_error(repo, what, "HF_HUB_OFFLINE is set and it is not in the HF cache", key)
    _probe_hub(repo, "text_encoder/config.json", what, key)
    try:
        return Path(snapshot_download(repo, endpoint=_hf_endpoint(), **kwargs))
    except Exception as err:
        if not _is_network_error(err):
            raise
        raise _hub_error(repo, what, f"{type(err).__name__}: {err}".splitlines()[0], key) from None


def _single_file_path(src: ModelSource) -> Path:
    if src.kind == "named":
        return _hf_file(src.repo, src.filename)
    return src.path


# --------------------------------------------------------------------------------------------------
# Reading single files: header first (names, shapes, metadata), weights only once they are known to fit


@dataclass
class _Header:
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


def _read_header(path: Path, key: str = "model.model_source") -> _Header:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: tuple(sl.get_shape()) for k, sl in slices.items()}
            dtypes = {k: str(sl.get_dtype()) for k, sl in slices.items()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{key}: {path} is not a readable .safetensors file ({err})") from None
    return _Header(path=path, shapes=shapes, dtypes=dtypes, metadata=metadata)


# Per-tensor scales of "scaled fp8" files (ComfyUI: <module>.scale_weight, diffusers/torchao: <module>.weight_scale);
# input scales are activation hints for fp8 matmuls and mean nothing once the weight is dequantised.
_WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROPPED_SUFFIXES = (".scale_input", ".input_scale")


def _scale_key(header: _Header, weight_key: str) -> str | None:
    if not weight_key.endswith(".weight"):
        return None
    module = weight_key.removesuffix(".weight")
    return next((module + s for s in _WEIGHT_SCALE_SUFFIXES if module + s in header.shapes), None)


def _is_aux_key(key: str) -> bool:
    return key.endswith(_WEIGHT_SCALE_SUFFIXES + _DROPPED_SUFFIXES)


def _read_tensors(header: _Header, names: list[str], dtype, device) -> dict[str, torch.Tensor]:
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


def _lora_like(keys) -> bool:
    return any("lora_" in k or ".lora." in k or k.startswith("lora_unet") for k in keys)


def _not_ltxv_error(key: str, path: Path, part: str, shapes: dict) -> UserError:
    if _lora_like(shapes):
        return UserError(
            f"{key}: {path} is a LoRA file, not a base model (set model.model_source to the LTXV base checkpoint; "
            "a LoRA cannot be the starting point)"
        )
    sample = ", ".join(sorted(shapes)[:3]) or "no tensors"
    return UserError(
        f"{key}: {path} holds no LTXV {part} weights (found e.g. {sample}); give an LTXV checkpoint such as "
        "ltxv-13b-0.9.7-dev.safetensors, or a named version like LTXV_13B_097_DEV"
    )


# The transformer: names normalised here (keys.py renames), then matched against the shipped configs.

_TRANSFORMER_PREFIXES = (ORIGINAL_TRANSFORMER_PREFIX, "diffusion_model.", "transformer.", "")


def _transformer_names(header: _Header) -> dict[str, str]:
    """diffusers name -> name in the file, for the transformer part of a single file (any known naming)."""
    keys = [k for k in header.shapes if not k.startswith("vae.") and not _is_aux_key(k)]
    for prefix in _TRANSFORMER_PREFIXES:
        picked = [k for k in keys if k.startswith(prefix)]
        if any(".transformer_blocks." in "." + k[len(prefix) :] for k in picked):
            return {original_to_diffusers(strip_compile_prefix(k[len(prefix) :])): k for k in picked}
    return {}


def _describe_transformer(shapes: dict[str, tuple]) -> str:
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    width = shapes.get("proj_in.weight", (None,))[0]
    return f"{len(blocks)} transformer blocks of width {width}"


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


def _mismatch_text(missing, unexpected, wrong) -> str:
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            parts.append(f"{len(names)} {label} (e.g. {names[0]})")
    return ", ".join(parts)


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


def _metadata_transformer_config(header: _Header) -> dict | None:
    from .export import TRANSFORMER_CONFIG_KEY

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


def _metadata_vae_config(header: _Header) -> dict | None:
    # Lightricks files describe their VAE in their own (CausalVideoAutoencoder) terms, which the shipped configs
    # cover; a file may also carry a diffusers VAE config, which is then used as is.
    meta = header.config_section("vae")
    return dict(meta) if meta.get("_class_name") == "AutoencoderKLLTXVideo" else None


@contextmanager
def _config_folder(sub: str, config: dict):
    """A folder laid out like a diffusers repo (<sub>/config.json), as from_single_file(config=...) wants."""
    with tempfile.TemporaryDirectory(prefix="ltxv_cfg_") as tmp:
        (Path(tmp) / sub).mkdir()
        (Path(tmp) / sub / "config.json").write_text(json.dumps(config), encoding="utf-8")
        yield tmp


def _from_converted(cls, sub: str, config: dict, state: dict, dtype, device):
    """Build the model from `config` and the already diffusers-named `state`, via from_single_file, offline."""
    with _config_folder(sub, config) as cfg_dir:
        model = cls.from_single_file(
            state,
            config=cfg_dir,
            subfolder=sub,
            local_files_only=True,
            torch_dtype=dtype,
            low_cpu_mem_usage=True,
            device=device,
        )
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise UserError(f"{cls.__name__}: {len(left)} weights were not loaded (e.g. {left[0]}); the file does not fit")
    return model.to(device).eval()


def _match(cls, candidates, found_shapes) -> tuple[str, dict] | tuple[None, str]:
    first_problem = ""
    for label, cfg in candidates:
        problems = _mismatch(_expected_state(cls, cfg), found_shapes)
        if not any(problems):
            return label, cfg
        first_problem = first_problem or f"{label}: {_mismatch_text(*problems)}"
    return None, first_problem


def _match_single_file_transformer(path: Path, config_dir: Path | None):
    """(header, {diffusers name: name in file}, transformer config) from the file's header alone; no weights read."""
    from diffusers import LTXVideoTransformer3DModel

    header = _read_header(path)
    names = _transformer_names(header) if not _lora_like(header.shapes) else {}
    if not names:
        raise _not_ltxv_error("model.model_source", path, "transformer", header.shapes)
    found = {d: header.shapes[k] for d, k in names.items()}
    candidates = _candidates("transformer", config_dir, _TRANSFORMER_CONFIG_DIRS, _metadata_transformer_config(header))
    label, cfg = _match(LTXVideoTransformer3DModel, candidates, found)
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
    src = resolve_model_source(model_cfg)
    if src.kind == "diffusers":
        return {k: v for k, v in _load_config_dir(src.path, "transformer").items() if not k.startswith("_")}
    if src.kind == "single_file":
        _, _, cfg = _match_single_file_transformer(_single_file_path(src), src.config_dir)
        return {k: v for k, v in cfg.items() if not k.startswith("_")}
    return None


def _load_single_file_transformer(path: Path, config_dir: Path | None, dtype, device):
    from diffusers import LTXVideoTransformer3DModel

    header, names, cfg = _match_single_file_transformer(path, config_dir)
    tensors = _read_tensors(header, list(names.values()), dtype, device)
    state = {d: tensors[k] for d, k in names.items()}
    return _from_converted(LTXVideoTransformer3DModel, "transformer", cfg, state, dtype, device)


# The VAE: diffusers' own key conversion for Lightricks' layout, checked on meta tensors first.


def _vae_original_keys(header: _Header, key: str) -> dict[str, str]:
    """'vae.'-prefixed original name -> name in the file (a standalone VAE file may lack the prefix)."""
    if any(k.startswith("vae.") for k in header.shapes):
        return {k: k for k in header.shapes if k.startswith("vae.") and not _is_aux_key(k)}
    if "encoder.conv_in.conv.weight" in header.shapes and "decoder.conv_out.conv.weight" in header.shapes:
        parts = ("encoder", "decoder", "per_channel_statistics")
        return {f"vae.{k}": k for k in header.shapes if k.split(".")[0] in parts and not _is_aux_key(k)}
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

    header = _read_header(path, key)
    if _lora_like(header.shapes):
        raise _not_ltxv_error(key, path, "VAE", header.shapes)
    names = _vae_original_keys(header, key)
    meta = {o: torch.empty(header.shapes[k], device="meta") for o, k in names.items()}
    found = {k: tuple(v.shape) for k, v in _convert_vae_state(meta).items()}
    if not found:
        raise _not_ltxv_error(key, path, "VAE", header.shapes)
    candidates = _candidates("vae", config_dir, _VAE_CONFIG_DIRS, _metadata_vae_config(header))
    label, cfg = _match(AutoencoderKLLTXVideo, candidates, found)
    if label is None:
        raise UserError(
            f"{key}: the VAE in {path} matches no known LTXV VAE (0.9.0, 0.9.1, 0.9.5+; closest {cfg}); "
            "set model.vae to a diffusers VAE folder for other VAEs"
        )
    tensors = _read_tensors(header, list(names.values()), dtype, device)
    state = _convert_vae_state({o: tensors[k] for o, k in names.items()})
    return _from_converted(AutoencoderKLLTXVideo, "vae", cfg, state, dtype, device)


# --------------------------------------------------------------------------------------------------
# Public loaders


def _diffusers_sub(folder: Path, sub: str, key: str) -> Path:
    if not (folder / sub / "config.json").is_file():
        raise UserError(f"{key}: {folder} has no {sub}/config.json (a diffusers LTXV folder needs {sub}/)")
    return folder


def load_transformer(model_cfg, dtype=torch.float32, device="cpu"):
    src = resolve_model_source(model_cfg)
    if src.kind == "tiny":
        return tiny.build_tiny_transformer().to(device=device, dtype=dtype)
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


def _local_override(value: str, key: str, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise _missing_path_error(key, path, what)
    return path.resolve()


def load_vae(model_cfg, dtype=torch.float32, device="cpu"):
    if model_cfg.vae:
        path = _local_override(model_cfg.vae, "model.vae", "a VAE .safetensors file or a diffusers VAE folder")
        return _load_vae_path(path, dtype, device, "model.vae")
    src = resolve_model_source(model_cfg)
    if src.kind == "tiny":
        return tiny.build_tiny_vae().to(device=device, dtype=dtype)
    if src.kind == "diffusers":
        key = "model.model_source"
        return _load_vae_path(_diffusers_sub(src.path, "vae", key), dtype, device, key)
    return _load_single_file_vae(_single_file_path(src), src.config_dir, dtype, device)


def _text_encoder_dirs(folder: Path, key: str) -> tuple[Path, Path]:
    """(tokenizer dir, encoder dir) of a folder with text_encoder/ + tokenizer/, or of a plain T5 folder."""
    if (folder / "text_encoder" / "config.json").is_file():
        tok = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder / "text_encoder"
        return tok, folder / "text_encoder"
    if (folder / "config.json").is_file():
        return folder, folder
    raise UserError(
        f"{key}: {folder} is not a T5 folder (expected text_encoder/ + tokenizer/ subfolders, or config.json + "
        "weights + tokenizer files)"
    )


def _text_encoder_source(model_cfg) -> tuple[str, Path | None]:
    """('tiny', None) | ('local', folder) | ('hf', None) - where the T5 comes from."""
    if model_cfg.text_encoder:
        return "local", _local_override(
            model_cfg.text_encoder, "model.text_encoder", "a T5 folder (text_encoder/ + tokenizer/)"
        )
    src = resolve_model_source(model_cfg)
    if src.kind == "tiny":
        return "tiny", None
    if src.kind == "diffusers" and (src.path / "text_encoder" / "config.json").is_file():
        return "local", src.path
    return "hf", None


def load_text_encoder(model_cfg, dtype=torch.float32, device="cpu"):
    kind, folder = _text_encoder_source(model_cfg)
    if kind == "tiny":
        return tiny.build_tiny_tokenizer(), tiny.build_tiny_text_encoder().to(device=device, dtype=dtype)
    key = "model.text_encoder" if model_cfg.text_encoder else "model.model_source"
    if kind == "hf":
        folder = _hf_text_encoder_folder()
    tok_dir, enc_dir = _text_encoder_dirs(folder, key)
    from transformers import T5EncoderModel, T5Tokenizer

    try:
        tokenizer = T5Tokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"{key}: cannot load the T5 tokenizer from {tok_dir} ({err})".splitlines()[0]) from None
    encoder = T5EncoderModel.from_pretrained(str(enc_dir), local_files_only=True, dtype=dtype)
    return tokenizer, encoder.to(device).eval()


def load_scheduler(model_cfg):
    src = resolve_model_source(model_cfg)
    if src.kind == "diffusers" and (src.path / "scheduler" / "scheduler_config.json").is_file():
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(str(src.path), subfolder="scheduler")
    return tiny.build_ltxv_scheduler()


# --------------------------------------------------------------------------------------------------
# Identities (cache keys) and metadata


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"file:{path}|{st.st_size}|{st.st_mtime_ns}"


def _folder_identity(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        st = f.stat()
        h.update(f"{f.relative_to(path).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"dir:{path}|{h.hexdigest()[:16]}"


def _path_identity(path: Path) -> str:
    return _folder_identity(path) if path.is_dir() else _file_identity(path)


def _hf_identity(src: ModelSource) -> str:
    return f"hf:{src.repo}/{src.filename}@{src.revision}"


def model_identity(model_cfg) -> dict:
    """Cheap identities of the three components (no weights read, nothing downloaded); used in cache keys."""
    src = resolve_model_source(model_cfg)
    if src.kind == "tiny":
        ident = {"transformer": tiny.TINY_IDENTITY, "vae": tiny.TINY_IDENTITY, "text_encoder": tiny.TINY_IDENTITY}
    elif src.kind == "named":
        ident = {"transformer": _hf_identity(src), "vae": _hf_identity(src) + "#vae"}
        ident["text_encoder"] = f"hf:{HF_REPO}/text_encoder+tokenizer@{HF_REVISION}"
    elif src.kind == "single_file":
        ident = {"transformer": _file_identity(src.path), "vae": _file_identity(src.path) + "#vae"}
        ident["text_encoder"] = f"hf:{HF_REPO}/text_encoder+tokenizer@{HF_REVISION}"
    else:
        ident = {"transformer": _folder_identity(src.path / "transformer"), "vae": _folder_identity(src.path / "vae")}
        kind, folder = _text_encoder_source(model_cfg)
        ident["text_encoder"] = (
            f"{_folder_identity(folder / 'text_encoder')}+{_folder_identity(folder / 'tokenizer')}"
            if kind == "local" and not model_cfg.text_encoder
            else f"hf:{HF_REPO}/text_encoder+tokenizer@{HF_REVISION}"
        )
    if model_cfg.vae:
        ident["vae"] = _path_identity(_local_override(model_cfg.vae, "model.vae", "a VAE file or folder"))
    if model_cfg.text_encoder:
        ident["text_encoder"] = _folder_identity(
            _local_override(model_cfg.text_encoder, "model.text_encoder", "a T5 folder")
        )
    return ident


def base_checkpoint_metadata(model_cfg) -> dict | None:
    """The safetensors metadata (e.g. Lightricks' "config" JSON) of a single-file base, for exports to carry over."""
    src = resolve_model_source(model_cfg)
    if src.kind not in ("named", "single_file"):
        return None
    return dict(_read_header(_single_file_path(src)).metadata) or None

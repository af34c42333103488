"""What `model.model_source` names, resolved once (no download, no weights read) into a typed `ModelSource`.

- `tiny`: the small random LTXV of `ltxv_tiny.py`; `tiny-ltx2`: the small random LTX-2 of `ltx2_tiny.py`;
- a named version (`LTXV_13B_097_DEV`, ...; case, `_`, `.` and `-` do not matter) -> one file of a Hugging Face
  repo, listed with its shipped configs in `model_configs/versions.json`;
- a local `*.safetensors` single file, or a local diffusers folder.

The family of a named version is its `versions.json` entry's "family" (default ltxv); of a local file or folder it is
read from the safetensors header's names / the transformer config's class (headers only, no weights).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import UserError

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"
HF_REVISION = "main"


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
    family: str = "ltxv"  # the model family module under models/ that loads it


@cache
def versions() -> dict[str, dict]:
    return json.loads((MODEL_CONFIGS / "versions.json").read_text(encoding="utf-8"))["versions"]


def _norm_name(name: str) -> str:
    return re.sub(r"[^0-9A-Z]", "", name.upper())


def named_versions() -> list[str]:
    return list(versions())


def lookup_version(text: str) -> str | None:
    wanted = _norm_name(text)
    for name in versions():
        if _norm_name(name) == wanted:
            return name
    return None


def _looks_like_path(text: str) -> bool:
    return any(c in text for c in "/\\~") or text.startswith(".") or text.lower().endswith(".safetensors")


def missing_path_error(key: str, path: Path, what: str) -> UserError:
    return UserError(f"{key}: {path} does not exist (give the path to {what})")


def existing_path(value: str, key: str, what: str) -> Path:
    """The local path setting `key` names, resolved; a one-line error naming the setting when it does not exist."""
    path = Path(value).expanduser()
    if not path.exists():
        raise missing_path_error(key, path, what)
    return path.resolve()


def text_encoder_source(model_cfg, what: str) -> tuple[str, Path | None]:
    """('tiny', None) | ('local', folder) | ('hf', None) - where a family's text encoder comes from: the folder
    `model.text_encoder` names (`what` describes it in the error), a diffusers folder's own, or its HF repo."""
    if model_cfg.text_encoder:
        return "local", existing_path(model_cfg.text_encoder, "model.text_encoder", what)
    src = model_cfg.source
    if src.kind == "tiny":
        return "tiny", None
    if src.kind == "diffusers" and (src.path / "text_encoder" / "config.json").is_file():
        return "local", src.path
    return "hf", None


# The transformer class of a diffusers folder -> its family (anything else: ltxv, whose loader explains a mismatch).
_DIFFUSERS_CLASS_FAMILY = {"LTX2VideoTransformer3DModel": "ltx2"}


def _folder_family(path: Path) -> str:
    try:
        config = json.loads((path / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "ltxv"  # the family's loader reports the unreadable config
    return _DIFFUSERS_CLASS_FAMILY.get(config.get("_class_name") if isinstance(config, dict) else None, "ltxv")


def header_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file from its JSON header alone (8-byte length + JSON; nothing else read).
    [] for a file too short or damaged to have one: the family's loader then reports it."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                return []
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return []
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []


def _file_family(path: Path) -> str:
    from . import ltx2_keys

    return "ltx2" if ltx2_keys.is_ltx2_file(header_keys(path)) else "ltxv"


def resolve(text: str) -> ModelSource:
    """Describe a `model.model_source` string (no download, no weights read); UserError for unknown names/paths.
    Config objects call this once (`ModelConfig.source`)."""
    text = text.strip()
    if text.lower() == "tiny":
        return ModelSource(kind="tiny", text=text)
    if text.lower() in ("tiny-ltx2", "tiny_ltx2"):
        return ModelSource(kind="tiny", text=text, family="ltx2")
    version = lookup_version(text)
    if version is not None:
        entry = versions()[version]
        return ModelSource(
            kind="named",
            text=text,
            version=version,
            repo=entry["repo"],
            filename=entry["filename"],
            revision=HF_REVISION,
            config_dir=MODEL_CONFIGS / entry["configs"],
            family=entry.get("family", "ltxv"),
        )
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "transformer" / "config.json").is_file():
            raise UserError(
                f"model.model_source: folder {path} is not a diffusers LTXV or LTX-2 folder (no "
                "transformer/config.json); give a folder with transformer/ and vae/ subfolders, or a single "
                ".safetensors file"
            )
        return ModelSource(kind="diffusers", text=text, path=path.resolve(), family=_folder_family(path))
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UserError(
                f"model.model_source: {path} is not a .safetensors file (only safetensors single files are read; "
                "pickled .ckpt/.pt/.bin files are not loaded for safety)"
            )
        return ModelSource(kind="single_file", text=text, path=path.resolve(), family=_file_family(path))
    if _looks_like_path(text):
        raise missing_path_error("model.model_source", path, "an LTXV or LTX-2 .safetensors file or a diffusers folder")
    close = difflib.get_close_matches(text.upper(), named_versions(), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UserError(
        f"model.model_source: unknown model {text!r} ({hint}use one of {', '.join(named_versions())}, "
        "a local .safetensors file, a diffusers folder, tiny or tiny-ltx2)"
    )


# Cheap identities of local weights (cache keys): path, size and modification time, never the bytes.


def file_identity(path: Path) -> str:
    st = path.stat()
    return f"file:{path}|{st.st_size}|{st.st_mtime_ns}"


def folder_identity(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        st = f.stat()
        h.update(f"{f.relative_to(path).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"dir:{path}|{h.hexdigest()[:16]}"


def path_identity(path: Path) -> str:
    return folder_identity(path) if path.is_dir() else file_identity(path)


def text_encoder_dirs(folder: Path, key: str, what: str) -> tuple[Path, Path]:
    """(tokenizer dir, model dir) of a folder with text_encoder/ + tokenizer/ subfolders, or of a plain transformers
    folder; `what` names the encoder in the error (T5, Gemma)."""
    if (folder / "text_encoder" / "config.json").is_file():
        tok = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder / "text_encoder"
        return tok, folder / "text_encoder"
    if (folder / "config.json").is_file():
        return folder, folder
    raise UserError(
        f"{key}: {folder} is not a {what} folder (expected text_encoder/ + tokenizer/ subfolders, or config.json + "
        "weights + tokenizer files)"
    )


def folder_scheduler(src: ModelSource):
    """The scheduler a diffusers folder ships (scheduler/scheduler_config.json), or None."""
    if src.kind != "diffusers" or not (src.path / "scheduler" / "scheduler_config.json").is_file():
        return None
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(str(src.path), subfolder="scheduler")

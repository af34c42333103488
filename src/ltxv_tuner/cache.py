"""The precomputed-data cache layout, defined once: preprocess writes it, training reads it.

<data_folder>/.precomputed/
    latents/<key>.safetensors      "latents": [C, F, H, W] float, normalised for the transformer
                                   (VAE latents_mean/std and scaling_factor applied), unpacked
    conditions/<key>.safetensors   "prompt_embeds": [L, D], "prompt_attention_mask": [L] (int64)
    manifests/<settings_key>.json  which clip uses which files; written last (see Manifest)
    decoded/                       optional mp4s decoded back from latents (preprocessing.decode_videos)

Keys are content hashes of everything that produced a file (ARCHITECTURE.md section 4), so a file is
either exactly right for the current settings or absent. Every file is written to a temporary name and
renamed, so a killed run never leaves a half-written file under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CACHE_FORMAT_VERSION = 1
PRECOMPUTED_DIR = ".precomputed"


def cache_root(data_folder: str | Path) -> Path:
    return Path(data_folder) / PRECOMPUTED_DIR


def latents_dir(root: Path) -> Path:
    return root / "latents"


def conditions_dir(root: Path) -> Path:
    return root / "conditions"


def manifests_dir(root: Path) -> Path:
    return root / "manifests"


def decoded_dir(root: Path) -> Path:
    return root / "decoded"


def latent_path(root: Path, key: str) -> Path:
    return latents_dir(root) / f"{key}.safetensors"


def condition_path(root: Path, key: str) -> Path:
    return conditions_dir(root) / f"{key}.safetensors"


def hash_key(parts: dict) -> str:
    """A stable short hash of a JSON-able dict (sorted keys); the cache key of whatever those parts produce."""
    blob = json.dumps({"format": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_json_atomic(path: Path, data: dict) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=False), encoding="utf-8"))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@dataclass
class CachedClip:
    """One training sample as the manifest records it."""

    video: str  # path relative to data_folder
    caption: str  # final caption text (id_token included)
    bucket: list[int]  # [width, height, frames]
    fps: float
    latent_key: str
    condition_key: str
    latent_shape: list[int] = field(default_factory=list)  # [C, F, H, W]


@dataclass
class Manifest:
    settings: dict  # everything that decides the keys (buckets, model identities, id_token, ...)
    clips: list[CachedClip]
    skipped: list[dict] = field(default_factory=list)  # {"path": ..., "reason": ...}
    format_version: int = CACHE_FORMAT_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        return cls(
            settings=data["settings"],
            clips=[CachedClip(**c) for c in data["clips"]],
            skipped=data.get("skipped", []),
            format_version=data.get("format_version", 0),
        )


def manifest_path(root: Path, settings_key: str) -> Path:
    return manifests_dir(root) / f"{settings_key}.json"

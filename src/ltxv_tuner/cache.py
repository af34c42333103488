"""The precomputed-data cache layout, defined once: preprocess writes it, training reads it.

<data_folder>/.precomputed/
    latents/<key>.safetensors      "latents": [C, F, H, W] float, normalised for the transformer
                                   (VAE latents_mean/std and scaling_factor applied), unpacked
    conditions/<key>.safetensors   "prompt_embeds": [L, D], "prompt_attention_mask": [L] (int64)
    manifests/<settings_key>.json  which clip uses which files, their sizes and checksums; written last (see Manifest)
    decoded/<clip>_<W>x<H>x<F>.mp4 optional previews decoded back from the latents (preprocessing.decode_videos),
                                   named after the clip and its bucket; those of the latest run that made them
    decoded.json                   preview name -> latent key it was decoded from (stale previews are redone)
    sources.json                   per source file: size, mtime, sha256 and probe result, so unchanged
                                   videos are neither hashed nor opened again (shared by all configs)

Keys are content hashes of everything that produced a file (ARCHITECTURE.md section 4), so a file is
either exactly right for the current settings or absent. Every file is written to a temporary name and
renamed, so a killed run never leaves a half-written file under its final name. The manifest records a
checksum of every tensor file it names (`file_checksum`), so a file damaged or edited later, even at the same
size, is noticed: preprocessing encodes it again, training refuses it naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from .errors import as_user_error

if TYPE_CHECKING:
    import torch

CACHE_FORMAT_VERSION = 1

# Temp files come out 0600; final files get the usual mode (the cache is shared by other configs and users,
# weight files are read by ComfyUI running as another user). Read once, at import: os.umask is process-wide.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
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


def decoded_name(video: str, bucket: list[int]) -> str:
    """`sub/take3.mkv` in bucket [128, 96, 17] -> `sub__take3_128x96x17.mp4`: which clip, which bucket."""
    stem = PurePosixPath(video).with_suffix("").as_posix().replace("/", "__")
    return f"{stem}_{'x'.join(map(str, bucket))}.mp4"


def decoded_path(root: Path, video: str, bucket: list[int]) -> Path:
    return decoded_dir(root) / decoded_name(video, bucket)


def decoded_index_path(root: Path) -> Path:
    return root / "decoded.json"


def sources_index_path(root: Path) -> Path:
    return root / "sources.json"


def hash_key(parts: dict) -> str:
    """A stable short hash of a JSON-able dict (sorted keys); the cache key of whatever those parts produce."""
    blob = json.dumps({"format": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def give_usual_mode(path: str | Path) -> None:
    """The mode a plain open() would give (0666 minus the umask); mkstemp and safetensors' save_file make 0600."""
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_write(path: Path, write) -> None:
    """Run write(tmp) on a temp file beside `path`, give it the usual mode, fsync, rename: never a half file.
    A failure of the machine (disk full, permission, read-only) is raised as a one-line `MachineError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise as_user_error(e, path, path.name) or e from None
    os.close(fd)
    try:
        write(tmp)
        give_usual_mode(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and (answer := as_user_error(e, path, path.name)) is not None:
            raise answer from e  # disk full, permission, read-only: one line naming the file
        raise


# torch is imported by the first tensor read or written, not by this module: a run that finds its cache complete
# checks it (sizes, CRC-32s, the manifest) without loading torch.
def save_file(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file as save

    save(tensors, path, metadata=metadata)


def load_file(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file as load

    return load(path)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_json_atomic(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=False), encoding="utf-8"))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


CHECKSUM_CHUNK = 1 << 20


def file_checksum(path: Path) -> str:
    """A cheap checksum of a file's bytes, `crc32:<8 hex digits>`: the manifest records one per tensor file, a
    checkpoint one per state file. CRC-32 is what zip and PNG use against damage, and the cheapest here (measured on a
    2.3 MB latent [128, 13, 16, 22] from the page cache: crc32 0.7 ms, sha256 1.6 ms, blake2b 3.7 ms)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


class CacheFileError(ValueError):
    """A cache file that cannot be read (truncated, overwritten, not safetensors)."""


def read_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(tensor name -> shape, string metadata) from a safetensors header, without reading the data.

    Raises CacheFileError when the file is missing or not a readable safetensors file.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            return shapes, dict(f.metadata() or {})
    except (OSError, SafetensorError) as e:
        raise CacheFileError(f"{path}: {e}") from None


STALE_TEMP_AGE_S = 15 * 60


def remove_stale_temp_files(root: Path, min_age_s: float = STALE_TEMP_AGE_S) -> int:
    """Delete temp files a killed run left behind (they never carry a final name). Returns how many.

    Only files untouched for `min_age_s` go: each temp file lives for seconds, so a younger one may belong to
    another run encoding into the same folder right now."""
    import time

    now = time.time()
    n = 0
    for sub in (latents_dir(root), conditions_dir(root), manifests_dir(root), decoded_dir(root), root):
        if sub.is_dir():
            for pattern in (".*.tmp", ".*.part.mp4"):
                for tmp in sub.glob(pattern):
                    try:
                        if now - tmp.stat().st_mtime < min_age_s:
                            continue
                    except FileNotFoundError:  # finished (renamed) meanwhile by that other run
                        continue
                    tmp.unlink(missing_ok=True)
                    n += 1
    return n


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
    reference: str | None = None  # IC-LoRA: the reference video, relative to dataset.reference_folder
    reference_key: str | None = None  # its latents (same bucket, frames and crop as the clip)
    audio_shape: list[int] = field(default_factory=list)  # LTX-2: [C, T, M] of its audio latents; [] = video-only


@dataclass
class Manifest:
    settings: dict  # everything that decides the keys (buckets, model identities, id_token, ...)
    clips: list[CachedClip]
    skipped: list[dict] = field(default_factory=list)  # {"path": ..., "reason": ...}
    format_version: int = CACHE_FORMAT_VERSION
    notes: list[dict] = field(default_factory=list)  # {"path": ..., "reason": ...}: reported, not blocking
    # For the no-work fast path: [size, mtime_ns] of every video/caption file scanned (relative to data_folder),
    # and the size of every cache file this manifest refers to (relative to the .precomputed root).
    sources: dict[str, list[int]] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    # file_checksum of every latent/condition/reference file (relative to the .precomputed root), recorded when the
    # manifest is written; training checks each file it opens. Manifests older than this have none (sizes only).
    checksums: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        return cls(
            settings=data["settings"],
            clips=[CachedClip(**c) for c in data["clips"]],
            skipped=data.get("skipped", []),
            format_version=data.get("format_version", 0),
            notes=data.get("notes", []),
            sources=data.get("sources", {}),
            files=data.get("files", {}),
            checksums=data.get("checksums", {}),
        )

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def manifest_path(root: Path, settings_key: str) -> Path:
    return manifests_dir(root) / f"{settings_key}.json"

"""Stage 1: clips + captions -> VAE latents and T5 embeddings under <data_folder>/.precomputed/.

Only what is missing is encoded. Each latent is keyed by the video's content hash, its bucket, the frame/resize
policy, the VAE identity, dtype, tiling and posterior policy (a sampled posterior is seeded by the key); each
condition by the final caption, the text-encoder identity, the token length, the caption encoding (T5 with or
without the mask) and dtype (cache.hash_key). A run with unchanged files and settings does no work at all: the
manifest records the size and mtime of every source file and the size and checksum of every cache file, and when
those all match it is returned without opening a video or loading a model. A cache file whose checksum differs
from the recorded one (damaged or edited since, even at the same size) is encoded again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import locks
from .cache import (
    CACHE_FORMAT_VERSION,
    CachedClip,
    CacheFileError,
    Manifest,
    cache_root,
    condition_path,
    conditions_dir,
    decoded_dir,
    decoded_index_path,
    decoded_name,
    decoded_path,
    file_checksum,
    hash_key,
    latent_path,
    latents_dir,
    manifest_path,
    manifests_dir,
    read_header,
    remove_stale_temp_files,
    sources_index_path,
    write_json_atomic,
)
from .data import (
    REFERENCE_PREFIX,
    CaptionError,
    ClipSource,
    Issue,
    ReferenceScan,
    choose_bucket,
    final_caption,
    read_caption,
    reference_bucket,
    scan_folder,
    scan_references,
)
from .errors import UserError
from .logs import progress
from .models import facts, family
from .video import (
    DEFAULT_FPS,
    VideoError,
    VideoInfo,
    probe_video,
    start_index,
)

# Bump when the way frames are picked or resized changes: every latent key changes with it.
FRAME_POLICY = "frames-by-order;resize-cover;center-crop;v1"
BUCKET_NAMES_SHOWN = 8  # clip names listed per bucket in the report (the manifest has them all)

log = logging.getLogger("ltxv_tuner.preprocess")


# --------------------------------------------------------------------------------------------------
# Settings and keys


COMPUTE_DTYPE = {"cuda": "bf16", "cpu": "fp32"}  # what the encoders run in (and so a cache-key setting)


def _device() -> str:
    """ "cuda" when torch sees a GPU, else "cpu". A CPU-only build of torch (its version.py says `cuda = None` and
    `hip = None`) is known to be "cpu" without importing torch, which a run that finds its cache complete never does."""
    spec = importlib.util.find_spec("torch")
    try:
        text = (Path(spec.origin).parent / "version.py").read_text(encoding="utf-8")
    except (AttributeError, TypeError, OSError):
        text = ""
    if all(re.search(rf"^{name}\b[^=\n]*=\s*None\s*$", text, re.MULTILINE) for name in ("cuda", "hip")):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _settings(cfg, device: str) -> dict:
    """Everything that decides the cache keys; its hash names the manifest. JSON-native (compared after a reload)."""
    ds, pp = cfg.dataset, cfg.dataset.preprocessing
    ident = facts(cfg.model).model_identity(cfg.model)
    return (
        {
            "buckets": [list(map(int, b)) for b in ds.resolution_buckets],
            "id_token": (ds.id_token or "").strip() or None,
            "max_text_length": pp.max_text_length,
            "caption_encoding": pp.caption_encoding,
            "frame_sampling": pp.frame_sampling,
            "frame_policy": FRAME_POLICY,
            "vae": str(ident["vae"]),
            "text_encoder": str(ident["text_encoder"]),
            "dtype": COMPUTE_DTYPE[device],
            "vae_tiling": pp.vae_tiling,
            "vae_posterior": pp.vae_posterior,
        }
        | _reference_settings(cfg)
        | _audio_settings(cfg, ident)
    )


def _audio_settings(cfg, ident: dict) -> dict:
    """Audio latents (LTX-2 with training.audio auto/on) are part of each latent file; a video-only cache's settings
    (every LTXV cache) stay as they were."""
    mode = facts(cfg.model).audio_mode(cfg)
    return {} if mode == "off" else {"audio": str(ident["audio_vae"]), "audio_mode": mode}


def _reference_settings(cfg) -> dict:
    """IC-LoRA only (a text-to-video cache's settings, and so its manifest, stay as they were); the downscale only
    when it is not 1 (a full-size reference cache keeps its manifest)."""
    if cfg.training.strategy != "ic_lora":
        return {}
    folder = str(_existing_folder(cfg.dataset.reference_folder, "dataset.reference_folder"))
    downscale = cfg.dataset.reference_downscale
    return {"reference_folder": folder} | ({"reference_downscale": downscale} if downscale != 1 else {})


def _latent_key(settings: dict, sha256: str, bucket: list[int], start: int) -> str:
    return hash_key(
        {
            "kind": "latent",
            "video_sha256": sha256,
            "bucket": bucket,
            "start_frame": start,
            "frame_policy": settings["frame_policy"],
            "vae": settings["vae"],
            "dtype": settings["dtype"],
            "vae_tiling": settings["vae_tiling"],
            "vae_posterior": settings["vae_posterior"],
            **({"audio": settings["audio"], "audio_mode": settings["audio_mode"]} if "audio" in settings else {}),
        }
    )


def _condition_key(settings: dict, caption: str) -> str:
    return hash_key(
        {
            "kind": "condition",
            "caption": caption,
            "text_encoder": settings["text_encoder"],
            "max_text_length": settings["max_text_length"],
            "caption_encoding": settings["caption_encoding"],
            "dtype": settings["dtype"],
        }
    )


def _existing_folder(value: str, key: str, what: str = "the folder that holds the clips") -> Path:
    folder = Path(value).expanduser()
    if not folder.exists():
        where = "" if folder.is_absolute() else f"; a relative path is read from the current folder {Path.cwd()}"
        raise UserError(f"{key}: {folder} does not exist (point it at {what}{where})")
    if not folder.is_dir():
        raise UserError(f"{key}: {folder} is a file, not a folder (give {what})")
    return folder.resolve() if key == "dataset.reference_folder" else folder


def _data_folder(cfg) -> Path:
    return _existing_folder(cfg.dataset.data_folder, "dataset.data_folder", "a folder of clip.mp4 + clip.txt pairs")


def _sources(folder: Path, settings: dict, files: list[Path]) -> dict[str, list[int]]:
    """[size, mtime_ns] of every file the cache depends on: clips and captions (`files`), and IC-LoRA references."""
    sources = _snapshot(folder, files)
    if "reference_folder" in settings:
        ref_folder = Path(settings["reference_folder"])
        refs = _snapshot(ref_folder, scan_references(ref_folder, []).files)
        sources |= {REFERENCE_PREFIX + rel: v for rel, v in refs.items()}
    return sources


def _snapshot(folder: Path, files: Iterable[Path]) -> dict[str, list[int]]:
    out = {}
    for p in files:
        st = p.stat()
        out[p.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def _jsonable(obj):
    return json.loads(json.dumps(obj))


# --------------------------------------------------------------------------------------------------
# Per-source memo: content hash and probe result, reused while size and mtime are unchanged


class _SourceIndex:
    def __init__(self, root: Path, folder: Path):
        self.path, self.folder = sources_index_path(root), folder
        self.entries: dict[str, dict] = {}
        self.dirty = False
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("format_version") == CACHE_FORMAT_VERSION:
                    self.entries = data.get("files", {})
            except (OSError, ValueError, AttributeError):
                self.entries = {}  # a damaged memo only costs re-hashing; it is rewritten below
                self.dirty = True

    def get(self, src: ClipSource) -> dict:
        """The memo of one video; {"error": ...} (not remembered: fixed permissions are seen next time) when the
        file cannot be read."""
        try:
            return self._get(src)
        except OSError as e:
            return {"error": f"cannot read the video ({e.strerror or type(e).__name__}); fix its permissions"}

    def _get(self, src: ClipSource) -> dict:
        st = src.video.stat()
        entry = self.entries.get(src.rel)
        if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return entry
        sha = _sha256(src.video)
        if entry and entry.get("sha256") == sha:  # touched, not changed: keep the probe
            entry = {**entry, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        else:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
            try:
                entry["probe"] = probe_video(src.video).to_json()
            except VideoError as e:
                entry["error"] = str(e)
        self.entries[src.rel] = entry
        self.dirty = True
        return entry

    def mark_bad(self, rel: str, latent_key: str, reason: str) -> None:
        """Remember a decode failure for this clip and latent key (another bucket may need fewer frames)."""
        if rel in self.entries:
            entry = self.entries[rel]
            entry["failed"] = {**entry.get("failed", {}), latent_key: reason}
            self.dirty = True

    def keep_only(self, rels: set[str]) -> None:
        for rel in set(self.entries) - rels:
            del self.entries[rel]
            self.dirty = True

    def save(self) -> None:
        if self.dirty:
            write_json_atomic(self.path, {"format_version": CACHE_FORMAT_VERSION, "files": self.entries})
            self.dirty = False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Planning: which clip goes to which bucket and files


@dataclass
class _Item:
    src: ClipSource
    caption: str  # final caption, id_token included
    bucket: list[int]
    start: int
    latent_key: str
    condition_key: str
    reference: _Item | None = None  # IC-LoRA: the reference clip (same bucket, start and crop; no caption)


@dataclass
class _Report:
    skipped: list[Issue] = field(default_factory=list)
    notes: list[Issue] = field(default_factory=list)
    latents_encoded: int = 0
    latents_reused: int = 0
    conditions_encoded: int = 0
    conditions_reused: int = 0
    repaired: int = 0
    decoded: int = 0
    previews_removed: int = 0
    pruned: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went: scan, model loads, encoding


def _plan_reference(src: ClipSource, refs: ReferenceScan, index: _SourceIndex, settings: dict, bucket, start):
    """(the reference _Item, None) or (None, why the clip is skipped). The reference takes the clip's frames and
    crop at its bucket divided by `reference_downscale` (the encoded size is in its latent key, like any bucket)."""
    path = refs.by_clip.get(src.rel)
    if path is None:
        return None, next(i.reason for i in refs.missing if i.path == src.rel)
    ref_folder = Path(settings["reference_folder"])
    rsrc = ClipSource(rel=REFERENCE_PREFIX + path.relative_to(ref_folder).as_posix(), video=path, caption=path)
    entry = index.get(rsrc)
    if entry.get("error"):
        return None, f"reference {rsrc.rel}: {entry['error']}"
    frames = VideoInfo(**entry["probe"]).num_frames
    if frames < start + bucket[2]:
        return None, (
            f"reference {rsrc.rel} has {frames} frames; the clip is trained on frames {start}..{start + bucket[2] - 1} "
            "and the reference must cover the same span"
        )
    ref_bucket = reference_bucket(bucket, settings.get("reference_downscale", 1))
    key = _latent_key(settings, entry["sha256"], ref_bucket, start)
    if key in entry.get("failed", {}):
        return None, f"reference {rsrc.rel}: {entry['failed'][key]}"
    return _Item(src=rsrc, caption="", bucket=ref_bucket, start=start, latent_key=key, condition_key=""), None


def _plan_clip(folder: Path, src: ClipSource, index: _SourceIndex, settings: dict, refs, report: _Report):
    """The clip's _Item, or None with the reason reported."""
    caption_rel = src.caption.relative_to(folder).as_posix()
    try:
        caption, note = read_caption(src.caption)
    except CaptionError as e:
        report.skipped.append(Issue(caption_rel, str(e)))
        return None
    if note:
        report.notes.append(Issue(caption_rel, note))
    entry = index.get(src)
    if entry.get("error"):
        report.skipped.append(Issue(src.rel, entry["error"]))
        return None
    info = VideoInfo(**entry["probe"])
    bucket, why = choose_bucket(info.width, info.height, info.num_frames, settings["buckets"])
    if bucket is None:
        report.skipped.append(Issue(src.rel, why))
        return None
    start = start_index(info.num_frames, bucket[2], settings["frame_sampling"])
    latent_key = _latent_key(settings, entry["sha256"], bucket, start)
    if latent_key in entry.get("failed", {}):
        report.skipped.append(Issue(src.rel, entry["failed"][latent_key]))
        return None
    reference = None
    if refs is not None:
        reference, why = _plan_reference(src, refs, index, settings, bucket, start)
        if reference is None:
            report.skipped.append(Issue(src.rel, why))
            return None
    caption = final_caption(caption, settings["id_token"])
    condition_key = _condition_key(settings, caption)
    return _Item(src, caption, bucket, start, latent_key, condition_key, reference)


def _plan(folder: Path, root: Path, settings: dict, report: _Report) -> tuple[list[_Item], _SourceIndex]:
    scan = scan_folder(folder)
    report.skipped += scan.skipped
    report.notes += scan.notes
    index = _SourceIndex(root, folder)
    keep = {p.relative_to(folder).as_posix() for p in scan.files}
    refs = None
    if "reference_folder" in settings:
        ref_folder = Path(settings["reference_folder"])
        refs = scan_references(ref_folder, [c.rel for c in scan.clips])
        report.skipped += refs.orphans
        keep |= {REFERENCE_PREFIX + p.relative_to(ref_folder).as_posix() for p in refs.files}
    items = []
    for src in progress(scan.clips, desc="scan", unit="clip", leave=False, disable=len(scan.clips) < 20):
        item = _plan_clip(folder, src, index, settings, refs, report)
        if item is not None:
            items.append(item)
    index.keep_only(keep)
    index.save()
    return items, index


def _check_latent(path: Path, bucket: list[int], fam) -> bool:
    try:
        shapes, _ = read_header(path)
    except CacheFileError:
        return False
    shape = shapes.get("latents")
    return shape is not None and len(shape) == 4 and shape[1:] == fam.latent_shape(*bucket)


def _check_condition(path: Path, max_len: int) -> bool:
    try:
        shapes, _ = read_header(path)
    except CacheFileError:
        return False
    emb, mask = shapes.get("prompt_embeds"), shapes.get("prompt_attention_mask")
    return emb is not None and mask is not None and len(emb) == 2 and emb[0] == max_len and mask == [max_len]


class _Checksums:
    """The checksums the manifests recorded for each cache file, and what the files hold now (each file is read
    once per run). A file is intact when it holds a checksum a manifest recorded for it: this config's, or another
    config's that shares the file (that one may have encoded it again since). A file no manifest recorded a checksum
    for (new, or named only by manifests older than checksums) is checked by its header alone."""

    def __init__(self, root: Path):
        self.root = root
        self.recorded: dict[str, set[str]] = {}
        self._now: dict[Path, str] = {}
        for mpath in sorted(manifests_dir(root).glob("*.json")) if manifests_dir(root).is_dir() else []:
            try:
                checksums = Manifest.read(mpath).checksums
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a damaged manifest records nothing usable; its config's next run rewrites it
            for rel, checksum in checksums.items():
                self.recorded.setdefault(rel, set()).add(checksum)

    def of(self, path: Path) -> str:
        if path not in self._now:
            self._now[path] = file_checksum(path)
        return self._now[path]

    def intact(self, path: Path) -> bool:
        recorded = self.recorded.get(path.relative_to(self.root).as_posix())
        return not recorded or self.of(path) in recorded

    def forget(self, path: Path) -> None:
        self._now.pop(path, None)


def _needed(paths: dict[str, Path], ok: Callable[[str, Path], bool], report: _Report, sums: _Checksums) -> list[str]:
    """Keys whose file is absent, unusable or changed since it was written (those are deleted and counted as
    repaired)."""
    missing = []
    for key, path in paths.items():
        if path.is_file():
            if not ok(key, path):
                reason = "cache file unreadable or of the wrong shape, encoded again"
            elif not sums.intact(path):
                reason = "cache file changed since it was written (its checksum differs), encoded again"
            else:
                continue
            path.unlink()
            sums.forget(path)
            report.repaired += 1
            report.notes.append(Issue(f"{path.parent.name}/{path.name}", reason))
        missing.append(key)
    return missing


# --------------------------------------------------------------------------------------------------
# Manifest, fast path, prune, report


def read_decoded_index(root: Path) -> dict[str, str]:
    try:
        index = json.loads(decoded_index_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or damaged: every preview is decoded again
    return index if isinstance(index, dict) else {}


def _previews_current(root: Path, clips: list[CachedClip]) -> bool:
    index = read_decoded_index(root)
    return all(
        index.get(decoded_name(c.video, c.bucket)) == c.latent_key and decoded_path(root, c.video, c.bucket).is_file()
        for c in clips
    )


def _tensor_files(root: Path, clip: CachedClip) -> list[Path]:
    """The cache files a clip trains on: its latents, its caption's condition, an IC-LoRA reference's latents."""
    paths = [latent_path(root, clip.latent_key), condition_path(root, clip.condition_key)]
    return paths + ([latent_path(root, clip.reference_key)] if clip.reference_key else [])


def _manifest_files(root: Path, clips: list[CachedClip], with_decoded: bool) -> dict[str, int]:
    files = {}
    for c in clips:
        paths = _tensor_files(root, c) + ([decoded_path(root, c.video, c.bucket)] if with_decoded else [])
        for p in paths:
            files[p.relative_to(root).as_posix()] = p.stat().st_size
    return files


def _manifest_checksums(root: Path, clips: list[CachedClip], sums: _Checksums) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sums.of(p) for c in clips for p in _tensor_files(root, c)}


def _reusable(mpath: Path, root: Path, settings: dict, sources: dict, with_decoded: bool) -> Manifest | None:
    """The manifest, when nothing it depends on changed and every file it names is present at its size."""
    if not mpath.is_file():
        return None
    try:
        manifest = Manifest.read(mpath)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable manifest: rebuilt by the full path
    if manifest.format_version != CACHE_FORMAT_VERSION or manifest.settings != settings:
        return None
    if manifest.sources != sources:
        return None
    if not manifest.checksums:
        return None  # written before checksums: the full path adds them (and encodes nothing that is intact)
    try:
        if any((root / rel).stat().st_size != size for rel, size in manifest.files.items()):
            return None
        if any(file_checksum(root / rel) != checksum for rel, checksum in manifest.checksums.items()):
            return None  # damaged or edited since: the full path encodes it again
    except OSError:
        return None
    if with_decoded and not _previews_current(root, manifest.clips):
        return None
    return manifest


def _clip_files(root: Path, clips: list[CachedClip]) -> set[Path]:
    files = {latent_path(root, c.latent_key) for c in clips} | {decoded_path(root, c.video, c.bucket) for c in clips}
    files |= {latent_path(root, c.reference_key) for c in clips if c.reference_key}  # IC-LoRA references
    return files | {condition_path(root, c.condition_key) for c in clips}


def _prune(root: Path, manifest: Manifest) -> int:
    """Delete cache files no clip of `manifest` refers to, except those of manifests a live run is reading
    (another config's training must not lose its files mid-run)."""
    keep = {root / rel for rel in manifest.files} | _clip_files(root, manifest.clips)
    for held in locks.live_reader_manifests(root):
        try:
            keep |= _clip_files(root, Manifest.read(held).clips)
        except (OSError, ValueError, KeyError, TypeError):
            print(f"  prune skipped: a live run reads {held}, which cannot be read here")
            return 0
    n = 0
    for folder in (latents_dir(root), conditions_dir(root), decoded_dir(root)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_file() and p not in keep:
                p.unlink()
                n += 1
    return n


def _dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _strict_error(skipped: list[Issue]) -> UserError:
    lines = "; ".join(f"{i.path}: {i.reason}" for i in skipped[:20])
    more = f" (+{len(skipped) - 20} more)" if len(skipped) > 20 else ""
    return UserError(
        f"dataset.strict is on and {len(skipped)} file(s) would be skipped: {lines}{more} "
        "(fix them, or set dataset.strict: false to train without them)"
    )


def _no_clip_error(folder: Path, skipped: list[Issue]) -> UserError:
    if not skipped:
        return UserError(
            f"dataset.data_folder: no clips in {folder} (expected video files - .mp4 .mov .avi .mkv .webm .m4v - "
            "each with a same-name .txt caption, e.g. clip1.mp4 + clip1.txt)"
        )
    lines = "; ".join(f"{i.path}: {i.reason}" for i in skipped[:10])
    return UserError(f"dataset.data_folder: no usable clip in {folder}, all {len(skipped)} skipped: {lines}")


def _bucket_lines(manifest: Manifest) -> list[str]:
    """Which clip went to which bucket (the first few names per bucket; the manifest lists every clip)."""
    by_bucket: dict[str, list[str]] = {"x".join(map(str, b)): [] for b in manifest.settings.get("buckets", [])}
    for c in manifest.clips:
        by_bucket.setdefault("x".join(map(str, c.bucket)), []).append(c.video)
    lines = []
    for bucket, videos in by_bucket.items():
        if not videos:
            lines.append(f"  bucket {bucket}: no clip (none fits its aspect ratio better, or all are too short)")
            continue
        more = len(videos) - BUCKET_NAMES_SHOWN
        shown = ", ".join(videos[:BUCKET_NAMES_SHOWN]) + (f", +{more} more" if more > 0 else "")
        lines.append(f"  bucket {bucket}: {len(videos)} clip(s): {shown}")
    return lines


def _issue_lines(title: str, issues: list) -> list[str]:
    return [f"  {title} {len(issues)}:", *(f"    {i.path}: {i.reason}" for i in issues)] if issues else []


def _log_report(mpath: Path, root: Path, manifest: Manifest, report: _Report, seconds: float) -> None:
    lines = [
        f"preprocess: {len(manifest.clips)} clip(s) ready in {root} ({seconds:.1f} s)",
        *_bucket_lines(manifest),
        f"  {'':12}{'encoded':>9}{'reused':>9}",
        f"  {'latents':12}{report.latents_encoded:>9}{report.latents_reused:>9}",
        f"  {'conditions':12}{report.conditions_encoded:>9}{report.conditions_reused:>9}",
    ]
    if report.repaired:
        lines.append(f"  repaired {report.repaired} damaged cache file(s) (see notes)")
    if report.decoded or report.previews_removed:
        removed = f", removed {report.previews_removed} old one(s)" if report.previews_removed else ""
        lines.append(f"  decoded {report.decoded} preview video(s) to {decoded_dir(root)}{removed}")
    if report.pruned:
        lines.append(f"  pruned {report.pruned} cache file(s) no clip refers to")
    if report.seconds:
        times = ", ".join(f"{k} {v:.2f} s" for k, v in report.seconds.items())
        rate = report.latents_encoded / report.seconds["latents"] if report.seconds.get("latents") else 0
        lines.append(f"  time: {times}" + (f" ({rate:.1f} clips/s encoded)" if rate else ""))
    lines += _issue_lines("skipped", report.skipped) + _issue_lines("notes", report.notes)
    lines.append(f"  cache size on disk: {_human(_dir_size(root))}; manifest {mpath.name}")
    log.info("\n".join(lines))


# --------------------------------------------------------------------------------------------------
# Public API


def _check_cache_writable(root: Path, folder: Path) -> None:
    """A read-only data folder (a shared mount, another user's files) fails here, before any encoding."""
    try:
        root.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise UserError(
            f"dataset.data_folder: cannot write the cache {root} ({e.strerror}); "
            f"make {folder} writable, or copy the clips and captions to a writable folder and point data_folder there"
        ) from None


def _reuse(cfg, mpath: Path, root: Path, settings: dict, sources: dict, t0: float) -> bool:
    """The fast path: True when the manifest for these settings is complete and nothing it depends on changed."""
    pp = cfg.dataset.preprocessing
    manifest = _reusable(mpath, root, settings, sources, pp.decode_videos)
    if manifest is None:
        return False
    if cfg.dataset.strict and manifest.skipped:
        raise _strict_error([Issue(**s) for s in manifest.skipped])
    pruned = _prune(root, manifest) if pp.prune else 0
    n = len(manifest.clips)
    extra = f", pruned {pruned} file(s)" if pruned else ""
    skipped = [Issue(**s) for s in manifest.skipped]
    lines = [
        f"preprocess: cache reused, nothing to encode ({n} clip(s){extra}; {time.perf_counter() - t0:.2f} s)",
        *_bucket_lines(manifest),
        *_issue_lines("skipped", skipped),
    ]
    log.info("\n".join(lines))
    return True


def _missing_conditions(cfg, root: Path, items: list[_Item], device, dtype, report: _Report, sums) -> None:
    max_len = cfg.dataset.preprocessing.max_text_length
    cond_paths = {it.condition_key: condition_path(root, it.condition_key) for it in items}
    cond_todo = _needed(cond_paths, lambda k, p: _check_condition(p, max_len), report, sums)
    report.conditions_reused = len(cond_paths) - len(cond_todo)
    if cond_todo:
        captions = {it.condition_key: it.caption for it in items}
        from . import encode

        encode.encode_conditions(cfg, root, {k: captions[k] for k in cond_todo}, device, dtype, report)


def _missing_latents(cfg, root, items: list[_Item], index: _SourceIndex, device, dtype, report: _Report, sums):
    """Encode the latents not yet cached. Returns (latent key -> why its video could not be decoded,
    latent key -> fps of the clips encoded now)."""
    fam = family(cfg.model)
    everything = items + [it.reference for it in items if it.reference is not None]
    first_by_latent: dict[str, _Item] = {}
    for it in everything:
        first_by_latent.setdefault(it.latent_key, it)
    lat_paths = {k: latent_path(root, k) for k in first_by_latent}
    lat_todo = _needed(lat_paths, lambda k, p: _check_latent(p, first_by_latent[k].bucket, fam), report, sums)
    report.latents_reused = len(lat_paths) - len(lat_todo)
    bad_reasons: dict[str, str] = {}
    if not lat_todo:
        return bad_reasons, {}

    def on_bad(item: _Item, reason: str) -> None:
        bad_reasons[item.latent_key] = reason
        for other in everything:  # identical files share the key: all of them failed
            if other.latent_key == item.latent_key:
                index.mark_bad(other.src.rel, item.latent_key, reason)

    from . import encode

    fps_by_key = encode.encode_latents(cfg, root, [first_by_latent[k] for k in lat_todo], device, dtype, report, on_bad)
    index.save()
    return bad_reasons, fps_by_key


def _cached_clips(root: Path, items: list[_Item], bad_reasons: dict, fps_by_key: dict, skipped: list[Issue]):
    clips = []
    for it in items:
        if it.latent_key in bad_reasons:
            skipped.append(Issue(it.src.rel, bad_reasons[it.latent_key]))
            continue
        ref = it.reference
        if ref is not None and ref.latent_key in bad_reasons:
            skipped.append(Issue(it.src.rel, f"reference {ref.src.rel}: {bad_reasons[ref.latent_key]}"))
            continue
        shapes, meta = read_header(latent_path(root, it.latent_key))
        fps = fps_by_key.get(it.latent_key) or float(meta.get("fps", DEFAULT_FPS))
        clips.append(
            CachedClip(
                video=it.src.rel,
                caption=it.caption,
                bucket=list(it.bucket),
                fps=fps,
                latent_key=it.latent_key,
                condition_key=it.condition_key,
                latent_shape=shapes["latents"],
                audio_shape=shapes.get("audio_latents", []),
                reference=ref.src.rel.removeprefix(REFERENCE_PREFIX) if ref else None,
                reference_key=ref.latent_key if ref else None,
            )
        )
    return clips


def _request(cfg) -> tuple[Path, Path, str, dict, Path, dict]:
    """(data folder, cache root, device, settings, manifest path, source snapshot) of this config, model-free."""
    folder = _data_folder(cfg)
    root = cache_root(folder)
    device = _device()
    settings = _jsonable(_settings(cfg, device))
    scan_files = scan_folder(folder).files
    if not scan_files:
        raise _no_clip_error(folder, [])
    mpath = manifest_path(root, hash_key(settings))
    return folder, root, device, settings, mpath, _sources(folder, settings, scan_files)


def reuse_cache(cfg) -> Path | None:
    """The manifest, reported, when this config's cache is complete and nothing it depends on changed; else None.
    Loads no model and imports neither diffusers nor transformers (nor torch, when torch is a CPU-only build)."""
    t0 = time.perf_counter()
    _, root, _, settings, mpath, sources = _request(cfg)
    return mpath if _reuse(cfg, mpath, root, settings, sources, t0) else None


def run_preprocess(cfg, reuse_checked: bool = False) -> Path:
    """Encode what is missing for the current config; return the manifest path. Prints what it did.
    `reuse_checked`: the caller's reuse_cache() just found the cache incomplete (its files are not read again)."""
    t0 = time.perf_counter()
    folder, root, device, settings, mpath, sources = _request(cfg)
    pp = cfg.dataset.preprocessing
    if not reuse_checked and _reuse(cfg, mpath, root, settings, sources, t0):
        return mpath

    from . import encode  # torch and the model code: only when something needs encoding

    dtype = encode.TORCH_DTYPES[settings["dtype"]]
    _check_cache_writable(root, folder)
    remove_stale_temp_files(root)
    report = _Report()
    t_scan = time.perf_counter()
    items, index = _plan(folder, root, settings, report)
    report.seconds["scan"] = time.perf_counter() - t_scan
    if cfg.dataset.strict and report.skipped:
        raise _strict_error(report.skipped)
    if not items:
        raise _no_clip_error(folder, report.skipped)
    # Text first, then the VAE: only one model is in memory at a time.
    sums = _Checksums(root)
    _missing_conditions(cfg, root, items, device, dtype, report, sums)
    bad_reasons, fps_by_key = _missing_latents(cfg, root, items, index, device, dtype, report, sums)
    report.skipped = list(report.skipped)
    clips = _cached_clips(root, items, bad_reasons, fps_by_key, report.skipped)
    if "audio" in settings:
        report.notes += [Issue(c.video, "no usable audio track: trains video-only") for c in clips if not c.audio_shape]
    if cfg.dataset.strict and report.skipped:
        raise _strict_error(report.skipped)
    if not clips:
        raise _no_clip_error(folder, report.skipped)
    if pp.decode_videos:
        encode.decode_previews(cfg, root, clips, device, dtype, report)

    manifest = Manifest(
        settings=settings,
        clips=clips,
        skipped=[i.to_json() for i in report.skipped],
        notes=[i.to_json() for i in report.notes],
        sources=sources,
        files=_manifest_files(root, clips, pp.decode_videos),
        checksums=_manifest_checksums(root, clips, sums),
    )
    write_json_atomic(mpath, manifest.to_json())  # last: a killed run leaves the previous manifest or none
    if pp.prune:
        report.pruned = _prune(root, manifest)
    _log_report(mpath, root, manifest, report, time.perf_counter() - t0)
    return mpath


def find_manifest(cfg) -> Path:
    """The manifest for the current settings (for `--only train`); UserError when preprocessing has not run."""
    folder = _data_folder(cfg)
    root = cache_root(folder)
    settings = _jsonable(_settings(cfg, _device()))
    mpath = manifest_path(root, hash_key(settings))
    if not mpath.is_file():
        raise UserError(
            f"no preprocessed data in {root} for the current dataset/model settings: run preprocessing first "
            "(drop `--only train`, or run with `--only preprocess`)"
        )
    manifest = Manifest.read(mpath)
    missing = [rel for rel in manifest.files if not (root / rel).is_file()]
    if missing:
        raise UserError(
            f"{mpath}: {len(missing)} cache file(s) it lists are gone (e.g. {missing[0]}): run preprocessing again"
        )
    # Training on a cache older than the folder would silently use old captions and miss new clips.
    now = _sources(folder, settings, scan_folder(folder).files)
    if now != manifest.sources:
        changed = sorted(set(now) ^ set(manifest.sources)) + sorted(
            k for k in set(now) & set(manifest.sources) if now[k] != manifest.sources[k]
        )
        raise UserError(
            f"dataset.data_folder: {len(changed)} file(s) in {folder} were added, removed or changed since "
            f"preprocessing (e.g. {', '.join(changed[:3])}): drop `--only train` (or run `--only preprocess` first) "
            "so the cache is brought up to date"
        )
    return mpath

"""The dataset folder: which clips pair with which caption, reading captions, choosing a bucket per clip.

Rules (each problem becomes a one-line reason in the preprocessing report, never a silent drop):
- a clip is `<stem>.<video ext>` (any case) with `<stem>.txt` beside it; subfolders are scanned too;
  hidden files and folders (`.precomputed`, macOS `._clip.mp4`) are ignored;
- a video without its .txt is skipped; a .txt without a video is listed as an orphan;
- two videos sharing one caption (`a.mp4` + `a.mov` with `a.txt`) are ambiguous: both skipped;
- captions are UTF-8 (a BOM is fine), CRLF or LF; surrounding blank space is stripped; several lines are joined
  with spaces (reported); an empty or non-UTF-8 caption skips the clip.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")  # any case

CAPTION_EXTENSION = ".txt"


class CaptionError(Exception):
    """A caption that cannot be used; the message is the one-line reason."""


@dataclass
class ClipSource:
    rel: str  # video path relative to the data folder, POSIX separators (the manifest's `video`)
    video: Path
    caption: Path


@dataclass
class Issue:
    path: str  # relative to the data folder
    reason: str

    def to_json(self) -> dict:
        return {"path": self.path, "reason": self.reason}


@dataclass
class ScanResult:
    clips: list[ClipSource] = field(default_factory=list)
    skipped: list[Issue] = field(default_factory=list)  # files that will not be trained on, with the reason
    notes: list[Issue] = field(default_factory=list)  # worth telling, not blocking (orphan captions, ...)
    files: list[Path] = field(default_factory=list)  # every video and caption file considered


def _printable(rel: str) -> str:
    """A path as it can be printed and written to JSON (a name that is not UTF-8 keeps its bytes as \\xNN)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _visible_files(folder: Path, problems: list[Issue] | None = None) -> list[Path]:
    """Files under `folder`, sorted; hidden files and folders skipped. A subfolder that cannot be read and a file
    whose name is not UTF-8 are reported in `problems` (their clips would otherwise vanish without a word)."""
    problems = [] if problems is None else problems

    def unreadable(err: OSError) -> None:
        rel = Path(err.filename).relative_to(folder).as_posix() if err.filename else "."
        reason = f"cannot read this folder ({err.strerror or type(err).__name__}): its files are not used; fix its"
        problems.append(Issue(_printable(rel) + "/", reason + " permissions"))

    out = []
    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                problems.append(Issue(_printable(rel), "file name is not valid UTF-8; rename it (e.g. plain ASCII)"))
                continue
            if path.is_file():
                out.append(path)
    return sorted(out)


def scan_folder(folder: str | Path) -> ScanResult:
    """Pair videos with captions. The folder must exist (the caller reports a missing folder)."""
    folder = Path(folder)
    result = ScanResult()
    videos: dict[Path, list[Path]] = defaultdict(list)  # stem path (no suffix) -> videos
    captions: dict[Path, Path] = {}
    for path in _visible_files(folder, result.skipped):
        suffix = path.suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            videos[path.with_suffix("")].append(path)
            result.files.append(path)
        elif suffix == CAPTION_EXTENSION:
            captions[path.with_suffix("")] = path
            result.files.append(path)

    def rel(p: Path) -> str:
        return p.relative_to(folder).as_posix()

    for stem, paths in sorted(videos.items()):
        caption = captions.get(stem)
        if len(paths) > 1:
            names = " and ".join(p.name for p in paths)
            reason = f"ambiguous: {names} would share the caption {stem.name}.txt (rename one, with its caption)"
            result.skipped += [Issue(rel(p), reason) for p in paths]
            continue
        if caption is None:
            result.skipped.append(Issue(rel(paths[0]), f"no caption file {stem.name}.txt beside it"))
            continue
        result.clips.append(ClipSource(rel=rel(paths[0]), video=paths[0], caption=caption))
    for stem, caption in sorted(captions.items()):
        if stem not in videos:
            result.notes.append(Issue(rel(caption), "caption without a video (orphan), ignored"))
    return result


def read_caption(path: str | Path) -> tuple[str, str | None]:
    """(caption text, note or None). Raises CaptionError for an empty, unreadable or undecodable caption."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise CaptionError(f"cannot read the caption ({e.strerror or type(e).__name__}); fix its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptionError(
            f"caption is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise CaptionError("caption file is empty; write a one-line description of the clip")
    note = f"caption has {len(lines)} lines, joined with spaces" if len(lines) > 1 else None
    return " ".join(lines), note


def final_caption(caption: str, id_token: str | None) -> str:
    """What the text encoder sees: `<id_token> <caption>` when a trigger word is set."""
    token = (id_token or "").strip()
    return f"{token} {caption}" if token else caption


def choose_bucket(
    width: int, height: int, num_frames: int, buckets: list[list[int]]
) -> tuple[list[int] | None, str | None]:
    """(bucket, None), or (None, reason) when the clip is shorter than every bucket.

    Among the buckets the clip has enough frames for: the closest aspect ratio (on a log scale, so 2:1 and 1:2 are
    equally far from 1:1), then the most frames, then the largest area.
    """
    fillable = [b for b in buckets if b[2] <= num_frames]
    if not fillable:
        shortest = min(b[2] for b in buckets)
        return None, f"too short: {num_frames} frames, the shortest bucket needs {shortest}"
    ratio = math.log(width / height)

    def rank(b: list[int]) -> tuple:
        return (round(abs(math.log(b[0] / b[1]) - ratio), 6), -b[2], -(b[0] * b[1]))

    return min(fillable, key=rank), None


# --------------------------------------------------------------------------------------------------
# IC-LoRA reference videos: a folder mirroring the data folder

REFERENCE_PREFIX = "@reference/"  # how reference files are named in reports and the cache's source list
SPATIAL_MULTIPLE = 32  # the video VAE's spatial compression: every encoded width and height is a multiple of it


def reference_bucket(bucket: list[int], downscale: int, what: str = "bucket") -> list[int]:
    """The size a clip's reference is encoded at: [width / n, height / n, frames] of the clip's bucket
    (`dataset.reference_downscale` n). UserError when a side would not stay a multiple of 32."""
    w, h, f = bucket
    if downscale == 1:
        return [w, h, f]
    step = SPATIAL_MULTIPLE * downscale
    if w % step or h % step:
        raise UserError(
            f"dataset.reference_downscale: {downscale} would encode the references of {what} {w}x{h}x{f} at "
            f"{w / downscale:g}x{h / downscale:g}, not multiples of 32; use a width and height that are multiples "
            f"of {step}, or a smaller reference_downscale"
        )
    return [w // downscale, h // downscale, f]


@dataclass
class ReferenceScan:
    by_clip: dict[str, Path] = field(default_factory=dict)  # clip rel -> its reference video
    missing: list[Issue] = field(default_factory=list)  # clips without (or with an ambiguous) reference
    orphans: list[Issue] = field(default_factory=list)  # references without a clip
    files: list[Path] = field(default_factory=list)  # every reference video considered


def scan_references(folder: Path, clip_rels: list[str]) -> ReferenceScan:
    """Pair each clip `sub/a.mp4` with `<folder>/sub/a.<any video ext>` (the extension may differ)."""
    result = ScanResult()
    by_stem: dict[str, list[Path]] = defaultdict(list)
    problems: list[Issue] = []
    for path in _visible_files(folder, problems):
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            by_stem[path.relative_to(folder).with_suffix("").as_posix()].append(path)
            result.files.append(path)
    out = ReferenceScan(files=result.files)
    out.orphans += [Issue(REFERENCE_PREFIX + i.path, i.reason) for i in problems]
    wanted = {}
    for rel in clip_rels:
        stem = Path(rel).with_suffix("").as_posix()
        wanted[stem] = rel
        found = by_stem.get(stem, [])
        if not found:
            out.missing.append(Issue(rel, f"no reference video {stem}.<video ext> in {folder} (ic_lora needs one)"))
        elif len(found) > 1:
            names = " and ".join(p.name for p in found)
            out.missing.append(Issue(rel, f"ambiguous reference: {names} in {folder} (keep one)"))
        else:
            out.by_clip[rel] = found[0]
    for stem, paths in sorted(by_stem.items()):
        if stem not in wanted:
            for p in paths:
                rel = REFERENCE_PREFIX + p.relative_to(folder).as_posix()
                out.orphans.append(Issue(rel, "reference without a clip of the same name in data_folder, ignored"))
    return out

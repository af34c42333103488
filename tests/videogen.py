"""Make small test clips and datasets: smooth synthetic motion, any container, rotation, variable frame rate, and
broken files of every kind. Importable by any test (`from videogen import make_clip, make_dataset`)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def smooth_frames(width: int, height: int, num_frames: int, seed: int = 0) -> np.ndarray:
    """uint8 [F, H, W, 3]: a colour gradient with a soft disc moving across; `seed` shifts colours and path.

    The top-left quarter is brighter than the rest, so orientation can be checked after decoding.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / max(1, width - 1), y / max(1, height - 1)
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.6, size=3).astype(np.float32)
    frames = []
    for i in range(num_frames):
        t = i / max(1, num_frames - 1)
        img = np.stack([base[0] + 0.3 * x, base[1] + 0.3 * y, base[2] + 0.2 * (1 - x) * t], -1)
        cx, cy = 0.2 + 0.6 * t, 0.5 + 0.25 * np.sin(2 * np.pi * (t + seed * 0.1))
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        a = np.clip((0.2 - d) / 0.05, 0, 1)[..., None]
        img = img * (1 - a) + a * np.array([0.95, 0.9, 0.2], dtype=np.float32)
        img[: height // 2, : width // 2] += 0.25
        frames.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.stack(frames)


def write_clip(
    path: str | Path,
    frames: np.ndarray,
    fps: float = 24,
    rotation: int = 0,
    times: list[float] | None = None,
    codec: str | None = None,
    pix_fmt: str = "yuv420p",
) -> Path:
    """Encode uint8 [F, H, W, 3] frames; container from the suffix (pix_fmt e.g. yuv444p, yuv420p10le).

    rotation: counter-clockwise display rotation stored in the stream's display matrix (the pixels are stored as
    given; a player shows them rotated). times: per-frame presentation times in seconds (variable frame rate).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if codec is None:
        codec = {".webm": "libvpx-vp9", ".avi": "mpeg4"}.get(path.suffix.lower(), "libx264")
    h, w = frames.shape[1:3]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "fast"}
        if rotation:
            stream.set_display_rotation(rotation)
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_clip(
    path: str | Path,
    width: int = 128,
    height: int = 96,
    num_frames: int = 17,
    seed: int = 0,
    caption: str | None = "a red ball bouncing on a wooden floor",
    **kwargs,
) -> Path:
    """A smooth clip plus its caption (`caption=None`: no .txt)."""
    path = write_clip(path, smooth_frames(width, height, num_frames, seed), **kwargs)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


def make_dataset(folder: str | Path, n: int = 2, width: int = 128, height: int = 96, num_frames: int = 17) -> Path:
    folder = Path(folder)
    for i in range(n):
        make_clip(folder / f"clip{i}.mp4", width, height, num_frames, seed=i, caption=f"a blue square sliding {i}")
    return folder


# ------------------------------------------------------------------------------------------------
# Broken inputs


def make_zero_byte(path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def make_truncated(path: str | Path, keep: float = 0.4, **clip_kwargs) -> Path:
    """A valid mp4 cut to `keep` of its size (the moov atom at the end is lost: unreadable)."""
    path = make_clip(path, caption=None, **clip_kwargs)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_corrupt(path: str | Path, **clip_kwargs) -> Path:
    """A valid clip whose middle bytes are overwritten with noise."""
    path = make_clip(path, caption=None, **clip_kwargs)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    lo, hi = len(data) // 8, len(data) * 7 // 8
    data[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def make_not_a_video(path: str | Path) -> Path:
    path = Path(path)
    path.write_text("this is a text file with a video extension\n" * 20, encoding="utf-8")
    return path


def make_audio_only(path: str | Path, seconds: float = 0.5) -> Path:
    """A real media file with one audio stream and no video stream."""
    path = Path(path)
    rate = 16000
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        t = np.arange(int(rate * seconds), dtype=np.float32) / rate
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, len(samples), 1024):
            chunk = samples[start : start + 1024]
            if len(chunk) < 1024:
                chunk = np.pad(chunk, (0, 1024 - len(chunk)))
            frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path

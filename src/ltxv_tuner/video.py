"""Video I/O with PyAV: probe a clip, decode the frames a bucket needs (resized to cover, centre-cropped), write mp4.

Everything here works on display orientation: a phone clip stored landscape with a 90-degree display matrix is
probed and decoded as portrait. Frames are taken by order, never by timestamp, so variable-frame-rate clips give
the same frames whatever their timing; the fps reported is the average over the frames taken.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
from av.video.reformatter import VideoReformatter

if TYPE_CHECKING:
    import torch

FRAME_THREADING_MIN_PIXELS = 512 * 384 * 49
DEFAULT_FPS = 24.0


class VideoError(Exception):
    """A clip that cannot be used; the message is a one-line reason shown in the preprocessing report."""


@dataclass
class VideoInfo:
    width: int  # display width (rotation and pixel aspect ratio applied)
    height: int  # display height
    num_frames: int  # frames the decoder delivers (counted, not taken from the header)
    fps: float  # average frame rate over the whole clip
    rotation: int  # counter-clockwise display rotation in degrees: 0, 90, 180 or 270

    def to_json(self) -> dict:
        return asdict(self)


def _open(path: Path):
    if path.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        container = av.open(str(path), "r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoError(f"not a readable video ({_short(e)})") from None
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream in the file")
    return container


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else e.__class__.__name__
    return text if len(text) < 120 else text[:117] + "..."


def _rotation(frame) -> int:
    rot = frame.rotation or 0
    return int(round(rot / 90.0)) % 4 * 90


def _sar(stream) -> Fraction:
    sar = stream.sample_aspect_ratio
    if sar is None or sar.numerator <= 0 or sar.denominator <= 0:
        return Fraction(1)
    return Fraction(sar.numerator, sar.denominator)


def _display_size(coded_w: int, coded_h: int, sar: Fraction, rotation: int) -> tuple[int, int]:
    w, h = max(1, round(coded_w * sar)), coded_h
    return (h, w) if rotation in (90, 270) else (w, h)


def _fps_from_times(times: list[float], nominal: float) -> float:
    """Average rate over frame times; the nominal rate when they agree within 1% (millisecond-rounded mkv pts)."""
    if len(times) >= 2 and times[-1] > times[0]:
        avg = (len(times) - 1) / (times[-1] - times[0])
        return nominal if abs(avg - nominal) <= 0.01 * nominal else avg
    return nominal


def _stream_rate(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and float(rate) > 0:
            return float(rate)
    return DEFAULT_FPS


def probe_video(path: str | Path) -> VideoInfo:
    """Size, orientation, real frame count and average fps, decoding only the first frame.

    The frame count comes from demuxing every packet (cheap, no decoding): container headers lie or are absent
    (mkv/webm have none), and a truncated file has fewer frames than its header says.
    """
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        first = None
        count = 0
        pts: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                count += 1
                if packet.pts is not None:
                    pts.append(packet.pts)
                if first is None:
                    for frame in packet.decode():
                        first = frame
                        break
            if first is None:  # the decoder may hold frames back until flushed
                for frame in stream.codec_context.decode(None):
                    first = frame
                    break
        except av.FFmpegError as e:
            if first is None or count == 0:
                raise VideoError(f"cannot decode the video stream ({_short(e)})") from None
        if first is None or count == 0:
            raise VideoError("the video stream holds no decodable frame")
        rotation = _rotation(first)
        width, height = _display_size(first.width, first.height, _sar(stream), rotation)
        fallback = _stream_rate(stream)
        tb = float(stream.time_base) if stream.time_base else 0.0
        times = sorted(p * tb for p in pts) if tb else []
        # Average over packet presentation times: right for variable frame rate, where the header rate is not.
        fps = _fps_from_times(times, fallback) if len(times) == count else fallback
        return VideoInfo(width=width, height=height, num_frames=count, fps=round(fps, 4), rotation=rotation)
    finally:
        container.close()


def cover_size(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int]:
    """The smallest size with the source's aspect ratio that covers dst_w x dst_h."""
    scale = max(dst_w / src_w, dst_h / src_h)
    return max(dst_w, round(src_w * scale)), max(dst_h, round(src_h * scale))


def _resize_to(frame_w: int, frame_h: int, sar, rotation: int, width: int, height: int) -> tuple[int, int, str]:
    """(width, height, interpolation) to resize a coded frame to, so that once rotated it covers width x height.
    Resizing happens in the coded orientation (swscale is fast and colour-correct); the small array is rotated."""
    disp_w, disp_h = _display_size(frame_w, frame_h, sar, rotation)
    cov_w, cov_h = cover_size(disp_w, disp_h, width, height)
    coded_w, coded_h = (cov_h, cov_w) if rotation in (90, 270) else (cov_w, cov_h)
    return coded_w, coded_h, "AREA" if coded_w * coded_h <= frame_w * frame_h else "BICUBIC"


def start_index(num_frames: int, wanted: int, sampling: str) -> int:
    if sampling == "center":
        return max(0, (num_frames - wanted) // 2)
    return 0


def read_clip(path: str | Path, width: int, height: int, num_frames: int, start: int = 0) -> tuple[torch.Tensor, float]:
    """Frames [start, start+num_frames) resized to cover width x height and centre-cropped, in display orientation.

    Returns (uint8 tensor [F, H, W, 3], average fps of the frames taken). Decoding stops after the last frame
    needed; frames before `start` are decoded (a decoder needs them) but never converted or resized.
    """
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        # FFmpeg frame threading starts one decoder per core: worth it for big clips, 10x slower for short small
        # ones (46-53 ms instead of 3-5 ms for 17 frames of 128x96 here). Break-even near 512x384x49.
        ctx = stream.codec_context
        if (ctx.width or 0) * (ctx.height or 0) * (start + num_frames) >= FRAME_THREADING_MIN_PIXELS:
            stream.thread_type = "AUTO"
        sar = _sar(stream)
        reformatter = VideoReformatter()  # one per clip: it keeps its swscale context (1.8x faster than frame.reformat)
        frames: list[np.ndarray] = []
        times: list[float] = []
        sizes: dict[tuple, tuple] = {}
        index = -1
        try:
            for frame in container.decode(stream):
                index += 1
                if index < start:
                    continue
                rotation = _rotation(frame)
                geometry = (frame.width, frame.height, rotation)
                if geometry not in sizes:  # the same for every frame of nearly every clip
                    sizes[geometry] = _resize_to(frame.width, frame.height, sar, rotation, width, height)
                coded_w, coded_h, interpolation = sizes[geometry]
                rgb = reformatter.reformat(
                    frame, width=coded_w, height=coded_h, format="rgb24", interpolation=interpolation
                ).to_ndarray()
                if rotation:
                    rgb = np.rot90(rgb, k=rotation // 90)
                top, left = (rgb.shape[0] - height) // 2, (rgb.shape[1] - width) // 2
                frames.append(np.ascontiguousarray(rgb[top : top + height, left : left + width]))
                if frame.time is not None:
                    times.append(frame.time)
                if len(frames) == num_frames:
                    break
        except av.FFmpegError as e:
            raise VideoError(f"decoding failed after {index + 1} frames ({_short(e)})") from None
        if len(frames) < num_frames:
            raise VideoError(f"only {max(index + 1, 0)} frames decodable, {start + num_frames} needed (truncated?)")
        fps = _fps_from_times(times, _stream_rate(stream)) if len(times) == len(frames) else _stream_rate(stream)
        import torch  # on first use: scanning and probing a folder need no torch

        return torch.from_numpy(np.stack(frames)), round(fps, 4)
    finally:
        container.close()


def frames_to_vae_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [3, F, H, W] in [-1, 1] (the LTXV VAE's input range)."""
    return to_vae_range(frames.permute(3, 0, 1, 2))


def to_vae_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any layout, any device) -> float32 in [-1, 1]. One allocation and in-place arithmetic: the same
    values as .float().div(127.5).sub(1.0), several times faster on large clips."""
    return pixels.float().div_(127.5).sub_(1.0)


def write_video(
    path: str | Path,
    frames: torch.Tensor | np.ndarray,
    fps: float,
    codec: str = "libx264",
    crf: int = 18,
    audio: torch.Tensor | np.ndarray | None = None,
    sample_rate: int = 16000,
) -> None:
    """Write uint8 [F, H, W, 3] frames. Container from the suffix (.mp4/.mkv/.mov/...); even sizes for yuv420p.

    audio: an optional float waveform [C, N] in [-1, 1] (C = 1 or 2) at `sample_rate`, muxed next to the video from
    time 0: AAC, or Opus in .webm (which takes no AAC; Opus runs at 48 kHz, the encoder resamples).
    """
    path = Path(path)
    samples = None if audio is None else _audio_samples(audio)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = frames.numpy() if hasattr(frames, "numpy") else np.asarray(frames)  # a torch tensor or an array
    h, w = arr.shape[1:3]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "medium"}
        audio_stream = None
        if samples is not None:
            opus = path.suffix.lower() == ".webm"
            audio_stream = container.add_stream("libopus" if opus else "aac", rate=48000 if opus else sample_rate)
            audio_stream.layout = "mono" if samples.shape[0] == 1 else "stereo"
        for img in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=audio_stream.layout.name)
            frame.sample_rate, frame.pts, frame.time_base = sample_rate, 0, Fraction(1, sample_rate)
            for packet in audio_stream.encode(frame):  # PyAV cuts it into encoder-sized frames
                container.mux(packet)
            for packet in audio_stream.encode():
                container.mux(packet)


def _audio_samples(audio: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = audio.detach().cpu().float().numpy() if hasattr(audio, "detach") else np.asarray(audio, np.float32)
    if arr.ndim != 2 or arr.shape[0] not in (1, 2) or arr.shape[1] == 0:
        raise ValueError(f"audio must be a float waveform [C, N] with C = 1 or 2, got shape {arr.shape}")
    return np.ascontiguousarray(np.clip(arr, -1.0, 1.0), dtype=np.float32)

"""Write the bundled quickstart clips: examples/quickstart_data/ (4 clips + captions, ~20 KB) and their IC-LoRA
references examples/quickstart_references/ (the same motion, colours inverted, as .mp4).

    python scripts/make_example_data.py [--out examples/quickstart_data] [--references examples/quickstart_references]

Smooth synthetic motion (gradients and moving shapes: lossy codecs keep these nearly exact, unlike noise), two
landscape and two portrait sizes, three containers, 20-32 frames. Designed for the quickstart buckets
[[128, 96, 17], [96, 128, 17]]: landscape clips land in 128x96, portrait ones in 96x128, each has >= 17 frames.
The output is byte-identical on every run (bit-exact muxing, fixed content, single-threaded x264).
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# name, width, height, frames, fps, scene, caption
CLIPS = [
    ("red_ball.mp4", 160, 120, 24, 24, "ball", "a red ball bouncing on a wooden floor"),
    ("stripes.mkv", 192, 108, 32, 24, "stripes", "colorful gradients moving left to right, circles and stripes"),
    ("blue_square.mov", 96, 128, 28, 24, "square", "a blue square sliding across a green field"),
    ("sunset.mp4", 120, 160, 20, 20, "sunset", "waves rolling onto a sandy beach at sunset"),
]


def _grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return x / (width - 1), y / (height - 1)


def render(scene: str, width: int, height: int, num_frames: int) -> np.ndarray:
    """uint8 [F, H, W, 3] of a smooth scene; deterministic."""
    x, y = _grid(width, height)
    frames = []
    for i in range(num_frames):
        t = i / max(1, num_frames - 1)
        if scene == "ball":  # warm wooden gradient, a soft red ball on a bouncing arc
            img = np.stack([0.55 + 0.2 * y, 0.35 + 0.15 * y, 0.2 + 0.05 * x], -1)
            cx, cy = 0.15 + 0.7 * t, 0.75 - 0.55 * abs(np.sin(np.pi * 2 * t))
            d = np.sqrt(((x - cx) * width / height) ** 2 + (y - cy) ** 2)
            a = np.clip((0.16 - d) / 0.03, 0, 1)[..., None]
            img = img * (1 - a) + a * np.array([0.9, 0.1, 0.1])
        elif scene == "stripes":  # diagonal colour bands drifting right, a pulsing ring
            phase = 2 * np.pi * (x * 2 + y * 0.5 - t)
            img = np.stack([0.5 + 0.4 * np.sin(phase + k * 2.1) for k in range(3)], -1)
            d = np.sqrt(((x - 0.5) * width / height) ** 2 + (y - 0.5) ** 2)
            ring = np.exp(-(((d - 0.15 - 0.15 * t) / 0.04) ** 2))[..., None]
            img = img * (1 - ring) + ring
        elif scene == "square":  # green field, sky gradient, a blue square sliding diagonally
            img = np.stack([0.2 + 0.1 * y, 0.45 + 0.3 * y, 0.25 + 0.1 * (1 - y)], -1)
            cx, cy = 0.25 + 0.5 * t, 0.3 + 0.4 * t
            inside = np.clip((0.14 - np.maximum(abs(x - cx), abs(y - cy) * height / width)) / 0.02, 0, 1)[..., None]
            img = img * (1 - inside) + inside * np.array([0.15, 0.25, 0.9])
        elif scene == "sunset":  # orange sky over blue sea, horizon waves rolling down, sun sinking
            horizon = 0.55 + 0.02 * np.sin(2 * np.pi * (x * 3 - t * 2))
            sky = np.stack([0.95 - 0.3 * y, 0.55 - 0.3 * y, 0.3 + 0.2 * y], -1)
            sea = np.stack([0.1 + 0.1 * np.sin(2 * np.pi * (y * 6 - t)), 0.3 + 0.1 * y, 0.6 - 0.1 * y], -1)
            img = np.where((y < horizon)[..., None], sky, sea)
            d = np.sqrt(((x - 0.5) * width / height) ** 2 + (y - (0.3 + 0.2 * t)) ** 2)
            sun = np.clip((0.1 - d) / 0.02, 0, 1)[..., None] * (y < horizon)[..., None]
            img = img * (1 - sun) + sun * np.array([1.0, 0.85, 0.4])
        else:
            raise ValueError(f"unknown scene {scene!r}")
        frames.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.stack(frames)


def rgb_to_i420(img: np.ndarray) -> np.ndarray:
    """BT.601 limited-range RGB -> I420 planes stacked as [H*3/2, W] (numpy, so no SIMD path can differ per run)."""
    rgb = img.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    h, w = y.shape

    def half(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [y.reshape(-1), half(u).reshape(-1), half(v).reshape(-1)]
    return np.clip(np.concatenate(planes).round(), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def write_bitexact(path: Path, frames: np.ndarray, fps: float, crf: int = 26) -> None:
    """yuv420p with bit-exact muxing (no random mkv UIDs, no version tags) and one encoder thread.

    H.264 (libx264) for .mp4/.mkv; MPEG-4 part 2 for .mov, because libx264 inside the mov muxer gave a
    bitstream that changed with the output path here, and the bundled files must be reproducible.
    """
    h, w = frames.shape[1:3]
    codec = "mpeg4" if path.suffix == ".mov" else "libx264"
    with av.open(str(path), "w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "slow", "threads": "1"}
        else:
            stream.codec_context.qscale = 4
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.codec_context.thread_count = 1
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb_to_i420(img), format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "quickstart_data")
    parser.add_argument("--references", type=Path, default=ROOT / "examples" / "quickstart_references")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.references.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, w, h, n, fps, scene, caption in CLIPS:
        path, ref = args.out / name, (args.references / name).with_suffix(".mp4")
        frames = render(scene, w, h, n)
        write_bitexact(path, frames, fps)
        write_bitexact(ref, 255 - frames, fps)  # the "control" video: the same motion, colours inverted
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        for p in (path, ref):
            total += p.stat().st_size
            print(f"{p.relative_to(args.out.parent)}: {w}x{h}, {n} frames @ {fps} fps, {p.stat().st_size} bytes")
    print(f"total video bytes: {total}")


if __name__ == "__main__":
    main()

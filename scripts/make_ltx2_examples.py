"""Write the bundled LTX-2 quickstart clips: examples/quickstart_ltx2_data/ (4 clips + captions, ~50 KB) and their
IC-LoRA references examples/quickstart_ltx2_references/ (edge maps, ~20 KB).

    python scripts/make_ltx2_examples.py [--out examples/quickstart_ltx2_data]
                                         [--references examples/quickstart_ltx2_references]

Tiny 128x96 clips of 33 frames at 24 fps (a valid LTX-2 bucket: sizes multiple of 32, frames 8n+1) whose sound
follows the motion: one clock (seconds) drives both the picture and the waveform. Three carry AAC audio in different
containers, rates and layouts (.mp4 16 kHz mono, .mov 24 kHz stereo, .mkv 48 kHz stereo); one has no audio track,
to show video-only samples in an audio-video dataset. Each clip's reference is its edge map (the control video of a
canny IC-LoRA), at half size (64x48, same 4:3 shape: the quickstart encodes references at half the bucket's size),
silent, same frames and frame rate. Byte-identical on every run (bit-exact muxing, one thread).
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from make_example_data import rgb_to_i420

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, NUM_FRAMES, FPS = 128, 96, 33, 24
DURATION = NUM_FRAMES / FPS
BOUNCE_PERIOD = 0.45  # seconds between two floor contacts of the ball
STRIPE_STEP = 8 / FPS  # the stripes jump every 8 frames

# name, scene, audio (sample rate, channels) or None, caption
CLIPS = [
    (
        "bouncing_ball.mp4",
        "ball",
        (16000, 1),
        "a red ball bouncing across a wooden floor, a sharp knock each time it hits the ground",
    ),
    (
        "sliding_square.mov",
        "square",
        (24000, 2),
        "a blue square sliding up and to the right over a green field, a humming tone rising in pitch as it climbs "
        "and moving from the left speaker to the right",
    ),
    (
        "stripes.mkv",
        "stripes",
        (48000, 2),
        "colorful diagonal stripes jumping to the right in steps, a burst of static with every jump",
    ),
    ("sunset.mp4", "sunset", None, "waves rolling onto a sandy beach at sunset, the sun slowly sinking"),
]


def ball_height(s: np.ndarray | float) -> np.ndarray:
    """0 on the floor, 1 at the top of the arc."""
    return np.abs(np.sin(np.pi * np.asarray(s) / BOUNCE_PERIOD))


def square_pos(s: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(s) / DURATION
    return 0.2 + 0.6 * u, 0.75 - 0.5 * u  # x left -> right, y bottom -> top (image rows grow downwards)


def stripe_shift(s: float) -> float:
    return 0.25 * np.floor(s / STRIPE_STEP + 1e-9)


def render(scene: str, s: float) -> np.ndarray:
    """uint8 [H, W, 3] of `scene` at time s (seconds)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    x, y = x / (WIDTH - 1), y / (HEIGHT - 1)
    aspect = WIDTH / HEIGHT
    if scene == "ball":
        img = np.stack([0.55 + 0.2 * y, 0.35 + 0.15 * y, 0.2 + 0.05 * x], -1)
        cx, cy = 0.15 + 0.7 * s / DURATION, 0.78 - 0.55 * ball_height(s)
        a = np.clip((0.16 - np.hypot((x - cx) * aspect, y - cy)) / 0.03, 0, 1)[..., None]
        img = img * (1 - a) + a * np.array([0.9, 0.1, 0.1])
    elif scene == "square":
        img = np.stack([0.2 + 0.1 * y, 0.45 + 0.3 * y, 0.25 + 0.1 * (1 - y)], -1)
        cx, cy = square_pos(s)
        inside = np.clip((0.14 - np.maximum(abs(x - cx), abs(y - cy) / aspect)) / 0.02, 0, 1)[..., None]
        img = img * (1 - inside) + inside * np.array([0.15, 0.25, 0.9])
    elif scene == "stripes":
        phase = 2 * np.pi * (x * 2 + y * 0.5 - stripe_shift(s))
        img = np.stack([0.5 + 0.4 * np.sin(phase + k * 2.1) for k in range(3)], -1)
    elif scene == "sunset":
        t = s / DURATION
        horizon = 0.55 + 0.02 * np.sin(2 * np.pi * (x * 3 - t * 2))
        sky = np.stack([0.95 - 0.3 * y, 0.55 - 0.3 * y, 0.3 + 0.2 * y], -1)
        sea = np.stack([0.1 + 0.1 * np.sin(2 * np.pi * (y * 6 - t)), 0.3 + 0.1 * y, 0.6 - 0.1 * y], -1)
        img = np.where((y < horizon)[..., None], sky, sea)
        d = np.hypot((x - 0.5) * aspect, y - (0.3 + 0.2 * t))
        sun = np.clip((0.1 - d) / 0.02, 0, 1)[..., None] * (y < horizon)[..., None]
        img = img * (1 - sun) + sun * np.array([1.0, 0.85, 0.4])
    else:
        raise ValueError(f"unknown scene {scene!r}")
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def sound(scene: str, rate: int, channels: int) -> np.ndarray:
    """float32 [channels, DURATION * rate] in [-1, 1] matching `scene`'s motion; deterministic."""
    n = round(DURATION * rate)
    s = np.arange(n) / rate
    rng = np.random.default_rng(0)
    if scene == "ball":  # a knock (damped 900 Hz + a little noise, 40 ms) at every floor contact
        wave = np.zeros(n)
        for hit in np.arange(0.0, DURATION, BOUNCE_PERIOD):
            i0 = round(hit * rate)
            k = np.arange(min(n - i0, round(0.04 * rate)))
            env = np.exp(-k / (0.008 * rate))
            wave[i0 : i0 + len(k)] += (
                0.6 * env * (np.sin(2 * np.pi * 900 * k / rate) + 0.3 * rng.standard_normal(len(k)))
            )
        out = wave[None]
    elif scene == "square":  # pitch rises as the square climbs, panned with its x position
        x, y = square_pos(s)
        freq = 220.0 * 2.0 ** (2 * (0.75 - y) / 0.5)  # 220 Hz at the bottom, 880 Hz at the top
        tone = 0.4 * np.sin(2 * np.pi * np.cumsum(freq) / rate)
        fade = np.minimum(1, np.minimum(s, DURATION - s) / 0.01)
        out = np.stack([tone * fade * np.cos(x * np.pi / 2), tone * fade * np.sin(x * np.pi / 2)])
    elif scene == "stripes":  # a 100 ms burst of static at every jump, alternating left and right
        out = np.zeros((channels, n))
        for j, jump in enumerate(np.arange(0.0, DURATION, STRIPE_STEP)):
            i0 = round(jump * rate)
            k = np.arange(min(n - i0, round(0.1 * rate)))
            out[j % channels, i0 : i0 + len(k)] += 0.5 * np.exp(-k / (0.03 * rate)) * rng.standard_normal(len(k))
    else:
        raise ValueError(f"no sound for scene {scene!r}")
    if out.shape[0] != channels:
        out = np.repeat(out.mean(axis=0, keepdims=True), channels, axis=0)
    return np.clip(out, -1, 1).astype(np.float32)


def edges(img: np.ndarray) -> np.ndarray:
    """uint8 [H/2, W/2, 3]: the Sobel edge strength of `img`'s luminance, white on black, halved in size (2x2 means)."""
    y = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    p = np.pad(y, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.clip(np.hypot(gx, gy) / 200.0, 0, 1)
    h, w = mag.shape
    half = mag.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    return np.repeat((half * 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def write_bitexact(path: Path, frames: np.ndarray, audio: np.ndarray | None, rate: int, crf: int = 26) -> None:
    """yuv420p video (H.264; MPEG-4 part 2 in .mov, as make_example_data.py explains) plus optional AAC audio,
    bit-exact muxing and one encoder thread, so the files are reproducible."""
    codec = "mpeg4" if path.suffix == ".mov" else "libx264"
    with av.open(str(path), "w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "slow", "threads": "1"}
        else:
            stream.codec_context.qscale = 4
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.codec_context.thread_count = 1
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream("aac", rate=rate)
            audio_stream.layout = "mono" if audio.shape[0] == 1 else "stereo"
            audio_stream.bit_rate = 24000 * audio.shape[0]
            audio_stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb_to_i420(img), format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            frame = av.AudioFrame.from_ndarray(audio, format="fltp", layout=audio_stream.layout.name)
            frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
            for packet in audio_stream.encode(frame):
                container.mux(packet)
            for packet in audio_stream.encode():
                container.mux(packet)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "quickstart_ltx2_data")
    parser.add_argument("--references", type=Path, default=ROOT / "examples" / "quickstart_ltx2_references")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.references.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, scene, audio_spec, caption in CLIPS:
        path, ref = args.out / name, (args.references / name).with_suffix(".mp4")
        frames = np.stack([render(scene, i / FPS) for i in range(NUM_FRAMES)])
        rate, channels = audio_spec or (0, 0)
        audio = sound(scene, rate, channels) if audio_spec else None
        write_bitexact(path, frames, audio, rate)
        write_bitexact(ref, np.stack([edges(f) for f in frames]), None, 0)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        total += path.stat().st_size + ref.stat().st_size
        sound_desc = f"AAC {rate} Hz x{channels}" if audio_spec else "no audio"
        print(
            f"{path.relative_to(args.out.parent)}: {WIDTH}x{HEIGHT}, {NUM_FRAMES} frames @ {FPS} fps, {sound_desc}, "
            f"{path.stat().st_size} bytes; reference {ref.relative_to(args.out.parent)}: {WIDTH // 2}x{HEIGHT // 2}, "
            f"{ref.stat().st_size} bytes"
        )
    print(f"total bytes: {total}")


if __name__ == "__main__":
    main()

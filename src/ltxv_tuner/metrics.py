"""Training metrics: logs/metrics.jsonl (one line per optimizer step) and a loss-curve PNG drawn with pillow."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

from .cache import atomic_write
from .errors import CHECKPOINTS_KEPT, as_user_error

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # blank, or the half line of a run killed while writing
    return rows


def append_metrics(path: Path, rows: list[dict]) -> None:
    """Append rows; a failure of the machine (disk full, ...) stops the run with a one-line answer."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        answer = as_user_error(e, path, "the training metrics", CHECKPOINTS_KEPT)
        if answer is None:
            raise
        raise answer from e


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only steps <= last_step: on resume, the steps after the checkpoint are trained again."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"))


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the curve users read; the raw points are drawn faintly behind it)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def draw_loss_curve(rows: list[dict], path: Path, size: tuple[int, int] = (800, 450)) -> Path | None:
    """Loss against step on a log scale; returns None when there is nothing finite to draw."""
    from PIL import Image, ImageDraw

    points = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    points = [(s, v) for s, v in points if v > 0]
    if not points:
        return None
    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    steps = [s for s, _ in points]
    logs = [math.log10(v) for _, v in points]
    s0, s1 = min(steps), max(steps)
    y0, y1 = min(logs), max(logs)
    if s1 == s0:
        s1 = s0 + 1
    if y1 - y0 < 1e-6:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def xy(step: float, logv: float) -> tuple[float, float]:
        x = left + (step - s0) / (s1 - s0) * (w - left - right)
        y = top + (y1 - logv) / (y1 - y0) * (h - top - bottom)
        return x, y

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        lv = y0 + frac * (y1 - y0)
        _, y = xy(s0, lv)
        draw.line([left, y, w - right, y], fill=(230, 230, 230))
        draw.text((5, y - 6), f"{10**lv:.3g}", fill=(60, 60, 60))
    draw.text((left, h - bottom + 8), f"step {s0}", fill=(60, 60, 60))
    draw.text((w - right - 80, h - bottom + 8), f"step {max(steps)}", fill=(60, 60, 60))
    draw.text((left, 8), "training loss (log scale)", fill=(0, 0, 0))
    raw = [xy(s, v) for s, v in zip(steps, logs, strict=True)]
    avg = [xy(s, v) for s, v in zip(steps, smooth(logs, max(1, len(logs) // 50)), strict=True)]
    if len(raw) > 1:
        draw.line(raw, fill=(180, 200, 235), width=1)
        draw.line(avg, fill=(30, 80, 200), width=2)
    else:
        x, y = raw[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 80, 200))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path

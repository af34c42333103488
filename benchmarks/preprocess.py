"""Preprocessing cache benchmark on the tiny model: cold run, warm (no-work) run, adding one clip.

    python benchmarks/preprocess.py [--clips 50] [--frames 17] [--size 128x96] [--workers 0] [--keep DIR]

Generates N smooth synthetic clips (tests/videogen.py), then times run_preprocess in this process:
cold (empty cache), warm (nothing changed: the target is <= 2% of cold), and one new clip added.
Model construction is inside the timings, as a user would see it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from videogen import make_clip  # noqa: E402

from ltxv_tuner.config import validate_config  # noqa: E402
from ltxv_tuner.preprocess import run_preprocess  # noqa: E402


def timed(cfg) -> tuple[float, str]:
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        run_preprocess(cfg)
    return time.perf_counter() - t0, out.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=50)
    p.add_argument("--frames", type=int, default=17, help="frames per generated clip (bucket uses 17)")
    p.add_argument("--size", default="128x96")
    p.add_argument("--workers", type=int, default=0, help="preprocessing.num_workers")
    p.add_argument("--keep", type=Path, default=None, help="write the data here instead of a temp folder")
    args = p.parse_args()
    w, h = map(int, args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "data"
        t0 = time.perf_counter()
        for i in range(args.clips):
            make_clip(folder / f"clip{i:03d}.mp4", w, h, args.frames, seed=i, caption=f"a red ball bouncing {i}")
        print(f"generated {args.clips} clips {w}x{h}x{args.frames} in {time.perf_counter() - t0:.1f} s")

        cfg = validate_config(
            {
                "dataset": {
                    "data_folder": str(folder),
                    "resolution_buckets": [[w // 32 * 32, h // 32 * 32, 17]],
                    "preprocessing": {"num_workers": args.workers},
                },
                "model": {"model_source": "tiny"},
            }
        )
        cold, _ = timed(cfg)
        warm, out = timed(cfg)
        assert "cache reused" in out, out
        make_clip(folder / "zz_new.mp4", w, h, args.frames, seed=999, caption="a new clip")
        add, out = timed(cfg)
        assert re.search(rf"latents\s+1\s+{args.clips}\n", out), out  # one encoded, the rest reused
        warm2, _ = timed(cfg)

    print(f"cold  (encode all {args.clips}):       {cold:8.2f} s  ({cold / args.clips * 1000:.0f} ms/clip)")
    print(f"warm  (nothing changed):       {warm * 1000:8.1f} ms  = {100 * warm / cold:.3f}% of cold (target <= 2%)")
    print(f"add one clip:                  {add:8.2f} s")
    print(f"warm after the addition:       {warm2 * 1000:8.1f} ms")


if __name__ == "__main__":
    main()

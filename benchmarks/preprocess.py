"""Preprocessing benchmark on the tiny model: the encoding stage against its limit, warm and whole-process no-op.

    python benchmarks/preprocess.py [--clips 50] [--frames 17] [--size 128x96] [--workers default,0,1,2] [--rounds 5]

Generates N smooth synthetic clips (tests/videogen.py), then prints, in one run (compare figures within a run:
shared machines are noisy):
- limit: clips/s of the T5 + VAE encoding alone, on clips decoded beforehand, on the stage's device and dtype, and
  arranged as the stage runs the VAE (on the CPU, small clips: one-thread lanes) - what the stage is bound by; and
  the VAE as one encoder with all of torch's threads (how it ran before lanes);
- cold: clips/s of the whole preprocessing call (scan, model loads, decode, encode, write) per num_workers, best and
  median of --rounds paired rounds (each round times the limit, then every setting, in rotated order), and the share
  of the limit it reaches (median and range of the per-round ratios); and of its encoding stage (decode + VAE + write,
  overlapped; the report's `time: ... latents` figure) against the VAE alone; and, for the first setting, that stage
  in a fresh `python train.py CONFIG --only preprocess` each round (as users run it: every kernel runs for the first
  time in the stage), against the same limit;
- the stage with an encoder off the CPU (it waits the VAE's own time instead of computing, as a GPU frees the CPU):
  how much of the decoding, conversion and writing the decode threads hide;
- warm: the same call with nothing to do, and after adding one clip (exactly one latent is encoded);
- no-op process: `python train.py CONFIG --only preprocess` on the complete cache, next to `python -c "import
  torch"` (the floor of any PyTorch process).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import yaml  # noqa: E402
from videogen import make_clip  # noqa: E402

from ltxv_tuner import encode  # noqa: E402
from ltxv_tuner.cache import cache_root, save_tensors_atomic  # noqa: E402
from ltxv_tuner.config import validate_config  # noqa: E402
from ltxv_tuner.encode import TORCH_DTYPES, cpu_lanes, decode_workers, intra_op_threads, lane_count  # noqa: E402
from ltxv_tuner.logs import quiet_libraries  # noqa: E402
from ltxv_tuner.models import ltxv, ltxv_tiny  # noqa: E402
from ltxv_tuner.preprocess import COMPUTE_DTYPE, _device, run_preprocess  # noqa: E402
from ltxv_tuner.video import frames_to_vae_input, read_clip  # noqa: E402


def timed(cfg) -> tuple[float, str]:
    """Seconds of one preprocessing call, and what it printed and logged (its report)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("ltxv_tuner")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            run_preprocess(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return time.perf_counter() - t0, out.getvalue()


def raw_config(folder: Path, w: int, h: int, workers: int | None) -> dict:
    return {
        "dataset": {
            "data_folder": str(folder),
            "resolution_buckets": [[w // 32 * 32, h // 32 * 32, 17]],
            "preprocessing": {"num_workers": workers},
        },
        "model": {"model_source": "tiny"},
    }


@torch.inference_mode()
def encode_limit(clips: list[Path], w: int, h: int, device: str, lanes: int) -> tuple[float, float, float]:
    """Seconds for T5 on every caption, for the VAE on every clip as the stage runs it (on the CPU in `lanes`
    one-thread lanes, 0 = not in lanes), and for the VAE as one encoder with torch's threads (the arrangement before
    lanes; the same figure where the stage does not use lanes). Frames are decoded and converted beforehand, and put
    on the device: this is the encoders' own speed on the stage's device and dtype."""
    dtype = TORCH_DTYPES[COMPUTE_DTYPE[device]]
    bucket = (w // 32 * 32, h // 32 * 32, 17)
    pixels = [frames_to_vae_input(read_clip(c, *bucket)[0])[None].to(device, dtype) for c in clips]
    captions = [c.with_suffix(".txt").read_text().strip() for c in clips]
    tok, enc, vae = ltxv_tiny.build_tiny_tokenizer(), ltxv_tiny.build_tiny_text_encoder(), ltxv_tiny.build_tiny_vae()
    enc, vae = enc.to(device, dtype), vae.to(device, dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def one(i: int) -> None:  # the default posterior draw, as preprocessing does
        with torch.inference_mode():
            ltxv.encode_video(vae, pixels[i], "sample", [i])

    sync()
    t0 = time.perf_counter()
    for text in captions:
        ltxv.encode_captions(tok, enc, [text], 128, device)
    sync()
    t1 = time.perf_counter()
    for i in range(len(pixels)):
        one(i)
    sync()
    t2 = time.perf_counter()
    if not lanes:
        return t1 - t0, t2 - t1, t2 - t1
    with intra_op_threads(1), ThreadPoolExecutor(lanes) as pool:
        list(pool.map(one, range(len(pixels))))
    return t1 - t0, time.perf_counter() - t2, t2 - t1


@torch.inference_mode()
def cpu_budget(clips: list[Path], w: int, h: int, lanes: int, tmp: Path) -> tuple[float, float, float]:
    """CPU seconds per clip, each on the thread that does it (time.thread_time): the VAE in one-thread lanes,
    decoding + conversion to the VAE's input, writing the latent file. Where the encoder shares the cores with the
    rest (the CPU), the stage can reach at most vae / (vae + decode + write) of the VAE alone."""
    bucket = (w // 32 * 32, h // 32 * 32, 17)
    c0 = time.thread_time()
    pixels = [frames_to_vae_input(read_clip(c, *bucket)[0])[None] for c in clips]
    decode = (time.thread_time() - c0) / len(clips)
    vae = ltxv_tiny.build_tiny_vae()

    def one(i: int) -> tuple[float, torch.Tensor]:
        with torch.inference_mode():
            c = time.thread_time()
            latents = ltxv.encode_video(vae, pixels[i], "sample", [i])
            return time.thread_time() - c, latents

    with intra_op_threads(1), ThreadPoolExecutor(max(lanes, 1)) as pool:
        done = list(pool.map(one, range(len(pixels))))
    c0 = time.thread_time()
    for i, (_, latents) in enumerate(done):
        save_tensors_atomic(tmp / f"latent{i}.safetensors", {"latents": latents[0].float()}, {"fps": "24.0"})
    write = (time.thread_time() - c0) / len(clips)
    return sum(c for c, _ in done) / len(clips), decode, write


def stage_seconds(report: str) -> float:
    """The encoding stage's seconds from the preprocessing report (`time: ... latents X s`)."""
    return float(re.search(r"latents (\d+\.\d+) s", report).group(1))


def preprocess_command(config: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), str(config), "--only", "preprocess"]


def process_stage(config: Path) -> float:
    """The encoding stage's seconds in `python train.py CONFIG --only preprocess`: a run as users start it, where
    each kernel runs for the first time inside the stage."""
    out = subprocess.run(preprocess_command(config), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"train.py --only preprocess failed:\n{out.stdout}{out.stderr}")
    return stage_seconds(out.stdout + out.stderr)


def process_noop(config: Path, repeat: int) -> tuple[list[float], list[float]]:
    def run(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - t0

    noop, floor = [], []
    for _ in range(repeat):  # alternated: a busy moment hits both alike
        noop.append(run(preprocess_command(config)))
        floor.append(run([sys.executable, "-c", "import torch"]))
    return noop, floor


def stats(values: list[float]) -> str:
    return f"best {min(values):.2f} s, median {statistics.median(values):.2f} s"


def cpu_steal() -> tuple[float, float]:
    """(seconds the machine's CPUs ran anything, seconds the hypervisor gave them to other guests): /proc/stat."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = 100.0  # USER_HZ
    return sum(fields[:8]) / tick, (fields[7] if len(fields) > 7 else 0.0) / tick


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=50)
    p.add_argument("--frames", type=int, default=17, help="frames per generated clip (bucket uses 17)")
    p.add_argument("--size", default="128x96")
    p.add_argument("--workers", default="default,0,1,2", help="preprocessing.num_workers values to compare")
    p.add_argument("--rounds", type=int, default=5, help="paired rounds: the limit, then each setting")
    args = p.parse_args()
    quiet_libraries()
    w, h = map(int, args.size.split("x"))
    workers = [None if x == "default" else int(x) for x in args.workers.split(",")]
    device = _device()
    lanes = lane_count() if cpu_lanes(device, (w // 32 * 32, h // 32 * 32, 17)) else 0
    arrangement = (
        f"{lanes} one-thread lanes (decoding a round side by side, then encoding it)"
        if lanes
        else f"{decode_workers(None)} decode thread(s) beside one encoder"
    )
    print(
        f"torch {torch.__version__} on {device}, {os.cpu_count()} cores, {torch.get_num_threads()} intra-op threads; "
        f"default arrangement: {arrangement}; {args.clips} clips {args.size}x{args.frames} (bucket x17); "
        f"{args.rounds} paired rounds"
    )

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        clips = [folder / f"clip{i:03d}.mp4" for i in range(args.clips)]
        for i, clip in enumerate(clips):
            make_clip(clip, w, h, args.frames, seed=i, caption=f"a red ball bouncing {i}")
        cfgs = {n: validate_config(raw_config(folder, w, h, n)) for n in workers}
        first_yaml = Path(tmp) / "bench.yaml"  # the first setting, for the runs in a process of their own
        first_yaml.write_text(yaml.safe_dump(raw_config(folder, w, h, workers[0])))
        timed(cfgs[workers[0]])  # warm-up: first decode, first conv kernels, page cache

        # Each round measures the limit and then every setting back to back, so a neighbour's load hits a round's
        # pair alike; the ratio is taken within a round (paired) and summarised over rounds.
        limits, vae_limits, one_encoder = [], [], []
        runs: dict = {n: [] for n in workers}
        stages: dict = {n: [] for n in workers}
        fresh: list[float] = []
        busy0, steal0 = cpu_steal()
        for r in range(args.rounds):
            t5, vae, vae_one = encode_limit(clips, w, h, device, lanes)
            limits.append(t5 + vae)
            vae_limits.append(vae)
            one_encoder.append(vae_one)
            for n in workers[r % len(workers) :] + workers[: r % len(workers)]:  # rotate the order
                shutil.rmtree(cache_root(folder), ignore_errors=True)
                seconds, report = timed(cfgs[n])
                runs[n].append(seconds)
                stages[n].append(stage_seconds(report))
            shutil.rmtree(cache_root(folder), ignore_errors=True)
            fresh.append(process_stage(first_yaml))
        busy1, steal1 = cpu_steal()
        steal = 100 * (steal1 - steal0) / max(busy1 - busy0, 1e-9)
        print(
            f"limit, T5 + VAE alone on decoded clips: {rate(args.clips, limits)}; VAE alone as the stage runs it "
            f"{rate(args.clips, vae_limits)}; as one encoder with {torch.get_num_threads()} threads "
            f"{rate(args.clips, one_encoder)} (CPU time taken by other guests meanwhile: {steal:.1f} %)"
        )
        for n in workers:
            name = f"num_workers={n}" if n is not None else "default"
            whole = [lim / t for lim, t in zip(limits, runs[n], strict=True)]
            stage = [lim / t for lim, t in zip(vae_limits, stages[n], strict=True)]
            one = [lim / t for lim, t in zip(one_encoder, stages[n], strict=True)]
            print(
                f"{name:>14}: encoding stage {rate(args.clips, stages[n])} = {share(stage)} of the VAE alone as "
                f"the stage runs it" + (f", {share(one)} of it as one encoder" if lanes else "") + "; "
                f"whole call {rate(args.clips, runs[n])} = {share(whole)} of the T5 + VAE limit"
            )
        if lanes:
            out = Path(tmp) / "budget"
            out.mkdir()
            vae_cpu, decode_cpu, write_cpu = cpu_budget(clips, w, h, lanes, out)
            print(
                f"CPU time per clip, one thread: VAE {1000 * vae_cpu:.1f} ms, decode + conversion "
                f"{1000 * decode_cpu:.1f} ms, cache write {1000 * write_cpu:.1f} ms: with every core encoding, the "
                f"stage can reach at most {100 * vae_cpu / (vae_cpu + decode_cpu + write_cpu):.0f} % of the VAE alone"
            )
        name = f"num_workers={workers[0]}" if workers[0] is not None else "default"
        stage = [lim / t for lim, t in zip(vae_limits, fresh, strict=True)]
        print(
            f"{name:>14} in a fresh process (train.py --only preprocess, as users run it): encoding stage "
            f"{rate(args.clips, fresh)} = {share(stage)} of the VAE alone as the stage runs it"
        )
        cfg = cfgs[workers[0]]
        warm, out = timed(cfg)
        assert "cache reused" in out, out
        make_clip(folder / "zz_new.mp4", w, h, args.frames, seed=999, caption="a new clip")
        add, out = timed(cfg)
        assert re.search(rf"latents\s+1\s+{args.clips}\n", out), out  # one encoded, the rest reused
        print(f"warm, nothing to do: {warm * 1000:.1f} ms in process; add one clip: {add:.2f} s (one latent encoded)")

        noop, floor = process_noop(first_yaml, args.rounds)
        print(f"no-op process (train.py --only preprocess): {stats(noop)}; `import torch` alone: {stats(floor)}")
        (folder / "zz_new.mp4").unlink()
        overlap(folder, cfgs, workers, args.clips, statistics.median(vae_limits) / args.clips)


def overlap(folder: Path, cfgs: dict, workers: list, clips: int, per_clip: float, rounds: int = 3) -> None:
    """The stage with an encoder that waits instead of computing (`per_clip` seconds, the VAE's own median): what a
    GPU is to the CPU. Decoding, conversion and writes then run beside the encoder on otherwise idle cores, so the
    figure shows how much of that work the pipeline hides, apart from how busy the machine's cores are."""
    real = ltxv.encode_video

    def off_cpu(vae, pixels, posterior="mode", seeds=None):
        time.sleep(per_clip * pixels.shape[0])
        dims = ltxv.latent_shape(pixels.shape[4], pixels.shape[3], pixels.shape[2])
        return torch.zeros(pixels.shape[0], 128, *dims)

    ltxv.encode_video = off_cpu
    lane_max, encode.LANE_MAX_PIXELS = encode.LANE_MAX_PIXELS, 0  # a GPU's arrangement: decode threads, one encoder
    try:
        for n in workers:
            seconds = []
            for _ in range(rounds):
                shutil.rmtree(cache_root(folder), ignore_errors=True)
                seconds.append(stage_seconds(timed(cfgs[n])[1]))
            name = f"num_workers={n}" if n is not None else f"default ({decode_workers(None)})"
            print(
                f"encoder off the CPU ({1000 * per_clip:.0f} ms per clip, limit {1 / per_clip:.1f} clips/s), {name}: "
                f"encoding stage {rate(clips, seconds)} = {100 * per_clip * clips / min(seconds):.0f} % of the limit"
            )
    finally:
        ltxv.encode_video = real
        encode.LANE_MAX_PIXELS = lane_max


def rate(clips: int, seconds: list[float]) -> str:
    return f"{clips / min(seconds):.1f} clips/s best, {clips / statistics.median(seconds):.1f} median"


def share(ratios: list[float]) -> str:
    """Paired ratios (limit time / measured time, one per round): median and range."""
    return f"{100 * statistics.median(ratios):.0f} % median ({100 * min(ratios):.0f}-{100 * max(ratios):.0f} %)"


if __name__ == "__main__":
    main()

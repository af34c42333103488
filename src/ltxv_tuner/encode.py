"""Stage 1's encoders: the models on the device turn what `preprocess` planned into cache files - T5 / Gemma
text features, VAE latents (decoded on background threads while the VAE encodes, written on another), audio
latents (LTX-2), and previews decoded back from the latents. Torch and the model code load only here: a run whose
cache is complete never imports this module."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .cache import (
    CACHE_FORMAT_VERSION,
    CachedClip,
    condition_path,
    decoded_dir,
    decoded_index_path,
    decoded_name,
    latent_path,
    load_tensors,
    save_tensors_atomic,
    write_json_atomic,
)
from .data import REFERENCE_PREFIX, Issue
from .logs import progress
from .models import family
from .video import VideoError, frames_to_vae_input, read_clip, to_vae_range, write_video

if TYPE_CHECKING:
    from .preprocess import _Item, _Report

log = logging.getLogger("ltxv_tuner.preprocess")

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # preprocess.COMPUTE_DTYPE's names


def posterior_seed(latent_key: str) -> int:
    """The seed of a clip's posterior draw: from its cache key, so encoding it again gives the same latents (and
    the file stays exactly what its key says)."""
    return int(latent_key[:15], 16)


# A model below this size is left to reference counting (and Python's own collector) on the CPU: a full collection
# costs ~0.3 s with torch + transformers loaded, 10 % of a 50-clip tiny-model run, and frees next to nothing.
COLLECT_MIN_PARAMS = 100_000_000
WRITE_AHEAD = 4  # latent files queued for the background writer before encoding waits for it


def _param_count(*models) -> int:
    return sum(p.numel() for m in models if isinstance(m, torch.nn.Module) for p in m.parameters())


def _release_memory(params: int) -> None:
    """After the caller dropped its references to models of `params` weights: collect them now and hand GPU memory
    back (on a GPU always; on the CPU when they were big enough for a collection to matter)."""
    if not torch.cuda.is_available() and params < COLLECT_MIN_PARAMS:
        return
    from diffusers.training_utils import free_memory

    free_memory()


@torch.inference_mode()
def encode_conditions(cfg, root: Path, captions: dict[str, str], device: str, dtype: torch.dtype, report: _Report):
    pp = cfg.dataset.preprocessing
    max_len, batch_size = pp.max_text_length, pp.batch_size
    fam = family(cfg.model)
    t0 = time.perf_counter()
    tokenizer, encoder = fam.load_text_encoder(cfg.model, dtype=dtype, device=device)
    t1 = time.perf_counter()
    report.seconds["text encoder load"] = t1 - t0
    keys = list(captions)
    with progress(total=len(keys), desc="captions", unit="caption") as bar:
        for i in range(0, len(keys), batch_size):
            batch = keys[i : i + batch_size]
            texts = [captions[k] for k in batch]
            embeds, masks = fam.encode_captions(tokenizer, encoder, texts, max_len, device, pp.caption_encoding)
            for j, key in enumerate(batch):
                full_len = fam.caption_token_count(tokenizer, texts[j])
                if full_len > max_len:
                    report.notes.append(
                        Issue(texts[j][:40], f"caption truncated from {full_len} to {max_len} tokens (max_text_length)")
                    )
                save_tensors_atomic(
                    condition_path(root, key),
                    {"prompt_embeds": embeds[j].float(), "prompt_attention_mask": masks[j].long()},
                    metadata={"caption": texts[j][:2000], "format_version": str(CACHE_FORMAT_VERSION)},
                )
                report.conditions_encoded += 1
            bar.update(len(batch))
    report.seconds["captions"] = time.perf_counter() - t1
    params = _param_count(encoder)
    del tokenizer, encoder
    _release_memory(params)


def convert_on_device(device: str) -> bool:
    """On a GPU the frames cross as uint8 (a quarter of float32's bytes) and become floats there; on the CPU the
    decode threads convert them, beside the VAE."""
    return device != "cpu"


# On the CPU, buckets up to this many pixels (w x h x frames) are encoded in lanes: worker threads that decode *and*
# encode clips, each encoding with one torch thread. Measured on 2 cores with the tiny VAE (benchmarks/preprocess.py):
# the VAE alone ran as fast or faster in 2 one-thread lanes as with 2 intra-op threads up to 256x192x33 (52 against
# 44-50 clips/s at 128x96x17, 4.0 against 4.0 at 256x192x33), slower above (1.8 against 2.5 at 512x384x49), and a
# decode thread beside a VAE that uses every core stalls it (the stage at 128x96x17: 29 clips/s with a decode
# thread, 34 decoding inline, 40-42 in lanes).
LANE_MAX_PIXELS = 256 * 192 * 33
MAX_LANES = 8  # beyond a few lanes Python's lock, not the cores, bounds small clips (not measured past 2 cores)
# Lanes work in rounds: every lane decodes, then every lane encodes (_in_rounds). A decode beside another lane's VAE
# took 8 ms of wall time for its 3 ms of CPU: PyAV lets go of Python's lock for each frame it demuxes, decodes and
# converts, and must win it back from the VAE's Python each time. Decoding side by side, the lanes only wait for each
# other. Measured (2 cores, 128x96x17, 50 clips, the stage against the VAE alone in lanes, medians of 6-10 paired
# rounds, four runs): 79-84 % decoding clip by clip, 84-92 % in rounds of 8 per lane; rounds of 16 lose less at
# their ends (one lane idle while the other finishes): 81 -> 84 % for 100 clips. A round holds its clips' frames,
# converted to float32, at once: at most ROUND_MAX_BYTES of them.
ROUND_PER_LANE = 16
ROUND_MAX_BYTES = 128 << 20


def cpu_lanes(device: str, bucket: tuple[int, int, int]) -> bool:
    """Whether a bucket's clips are encoded in lanes (see LANE_MAX_PIXELS). Otherwise (a GPU, big clips) the main
    thread encodes while num_workers threads decode."""
    w, h, f = bucket
    return device == "cpu" and w * h * f <= LANE_MAX_PIXELS


def decode_workers(setting: int | None) -> int:
    """Decode threads beside a GPU encoder (and beside a CPU one for big clips): dataset.preprocessing.num_workers,
    null = half the cores (1 to 4)."""
    if setting is not None:
        return setting
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def lane_count() -> int:
    """Lanes on the CPU: one per torch thread (torch.get_num_threads(): the cores, or OMP_NUM_THREADS), at most
    MAX_LANES. Not num_workers: every lane encodes with one torch thread, so its clips' bits never depend on it."""
    return max(1, min(MAX_LANES, torch.get_num_threads()))


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to n (None: unchanged) for the block, restored afterwards. Threads started in
    the block take the new count; the count changes the last bits of conv results, so it never depends on
    num_workers (the cache stays bit-identical whatever the worker count)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def round_size(lanes: int, batch_size: int, bucket: tuple[int, int, int]) -> int:
    """Batches per round of the lanes: ROUND_PER_LANE per lane, fewer where their frames (float32) would pass
    ROUND_MAX_BYTES (at least one per lane)."""
    w, h, f = bucket
    fit = ROUND_MAX_BYTES // (batch_size * w * h * f * 3 * 4)
    return max(lanes, min(ROUND_PER_LANE * lanes, fit))


def _in_rounds(units: list, first: Callable, second: Callable, workers: int, per_round: int) -> Iterator[tuple]:
    """(unit, first(unit), second(first(unit))) in order, on `workers` threads: `per_round` units at a time go
    through `first`, then through `second` (the threads never run both at once)."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clip-worker") as pool:
        # Start every thread now: the executor starts one per task only while none is idle, so a round of quick
        # decodes could leave a lane unstarted and the encodes on fewer threads. Tasks that wait for each other
        # keep the threads busy until all of them exist.
        barrier = threading.Barrier(workers)
        for _ in range(workers):
            pool.submit(barrier.wait)
        for start in range(0, len(units), per_round):
            chunk = units[start : start + per_round]
            done = list(pool.map(first, chunk))
            pending = [pool.submit(second, r) for r in done]
            try:
                for unit, r, fut in zip(chunk, done, pending, strict=True):
                    yield unit, r, fut.result()
            finally:
                for fut in pending:  # an error (or a consumer that stopped) leaves nothing queued behind it
                    fut.cancel()


def _in_order(units: list, fn: Callable, workers: int, ahead: int) -> Iterator[tuple]:
    """(unit, fn(unit)) in order; with workers > 0, fn runs in that many threads, at most `ahead` units ahead of the
    consumer (bounded memory). An exception in fn is raised here, at its unit."""
    if workers <= 0:
        for unit in units:
            yield unit, fn(unit)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clip-worker") as pool:
        pending = []
        it = iter(units)
        try:
            for unit in it:
                pending.append((unit, pool.submit(fn, unit)))
                if len(pending) >= ahead:
                    break
            while pending:
                unit, fut = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(fn, nxt)))
                yield unit, fut.result()
        finally:
            for _, fut in pending:  # an error (or a consumer that stopped) leaves nothing queued behind it
                fut.cancel()


class _Writer:
    """Cache files written (and fsynced) on one background thread while the next clip encodes, at most
    WRITE_AHEAD behind. A failed write (disk full, permission) is raised by the next put() or on leaving the block;
    leaving waits for every write, so each file put is complete on disk, or absent, afterwards."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-write")
        self._pending: list = []

    def put(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        while len(self._pending) >= WRITE_AHEAD:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(save_tensors_atomic, path, tensors, metadata))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        try:
            while self._pending:
                self._pending.pop(0).result()  # a failed write raises here (after the others finished)
        finally:
            self._pool.shutdown(wait=True)


class _AudioEncoder:
    """LTX-2: each clip's own audio track over the frames' time span -> log-mel -> audio VAE latents. A clip without
    an audio track (or with one that cannot be decoded) trains video-only, reported; with training.audio: on it is
    a reported skip instead."""

    def __init__(self, cfg, fam, device, dtype, report: _Report):
        self.fam, self.device, self.dtype, self.report = fam, device, dtype, report
        self.required = fam.audio_mode(cfg) == "on"
        self.posterior = cfg.dataset.preprocessing.vae_posterior
        self.vae = fam.load_audio_vae(cfg.model, dtype=dtype, device=device)

    def read(self, item: _Item, fps: float):
        """The clip's log-mel (None: video-only). In a decode thread."""
        mel, why = self.fam.clip_audio(item.src.video, item.start, item.bucket[2], fps)
        if mel is None:
            if self.required:
                raise VideoError(
                    f"{why} (training.audio: on needs audio in every clip; use auto to train it video-only)"
                )
            log.debug("%s: %s", item.src.rel, why)
        return mel

    def encode(self, item: _Item, mel: torch.Tensor, fps: float) -> torch.Tensor:
        frames = self.fam.audio_latent_frames(item.bucket[2], fps)
        mel = mel[None].to(device=self.device, dtype=self.dtype)
        latents = self.fam.encode_audio(self.vae, mel, frames, self.posterior, [posterior_seed(item.latent_key) + 1])
        return latents[0].float()


@torch.inference_mode()
def encode_latents(
    cfg, root: Path, todo: list[_Item], device: str, dtype: torch.dtype, report: _Report, on_bad: Callable
) -> dict[str, float]:
    """Encode one latent per item (items share no key). Returns fps per latent key; bad videos go to on_bad.

    Work goes in same-bucket batches (items keep folder order inside a bucket). On a GPU, worker threads decode
    the coming batches while the main thread encodes; on the CPU, small buckets go in lanes (cpu_lanes), worker
    threads that decode a round of batches side by side and then encode them. Files are written on a background
    thread either way."""
    pp = cfg.dataset.preprocessing
    fam = family(cfg.model)
    t0 = time.perf_counter()
    vae = fam.load_vae(cfg.model, dtype=dtype, device=device)
    if pp.vae_tiling:
        vae.enable_tiling()
    fps_by_key: dict[str, float] = {}
    by_bucket: dict[tuple, list[_Item]] = {}
    for item in todo:
        by_bucket.setdefault(tuple(item.bucket), []).append(item)

    audio = _AudioEncoder(cfg, fam, device, dtype, report) if fam.audio_mode(cfg) != "off" else None
    t1 = time.perf_counter()
    report.seconds["VAE load"] = t1 - t0

    on_device = convert_on_device(device)

    def decode(item: _Item):
        w, h, f = item.bucket
        frames, fps = read_clip(item.src.video, w, h, f, item.start)
        mel = audio.read(item, fps) if audio is not None and not item.src.rel.startswith(REFERENCE_PREFIX) else None
        return (frames.permute(3, 0, 1, 2) if on_device else frames_to_vae_input(frames)), fps, mel

    @torch.inference_mode()  # also in worker threads (the mode is per thread)
    def encode(decoded: list[tuple[_Item, torch.Tensor, float, object]]) -> list[dict[str, torch.Tensor]]:
        x = torch.stack([pixels for _, pixels, _, _ in decoded])
        x = (to_vae_range(x.to(device)) if on_device else x).to(device=device, dtype=dtype)
        seeds = [posterior_seed(item.latent_key) for item, _, _, _ in decoded]
        latents = fam.encode_video(vae, x, pp.vae_posterior, seeds)
        out = []
        for (item, _, fps, mel), lat in zip(decoded, latents, strict=True):
            tensors = {"latents": lat.float()}  # float32 on disk whatever the compute dtype: one contract for readers
            if mel is not None:
                tensors["audio_latents"] = audio.encode(item, mel, fps)
            out.append(tensors)
        return out

    def read(batch: list[_Item]) -> tuple[list, list]:  # in a worker thread, unless num_workers is 0 outside lanes
        decoded, bad = [], []
        for item in batch:
            try:
                decoded.append((item, *decode(item)))
            except VideoError as e:
                bad.append((item, str(e)))
        return decoded, bad

    def flow(batches: list, lanes: bool, workers: int) -> Iterator[tuple[list[_Item], list, list, list | None]]:
        """(batch, decoded, bad, encoded or None: the caller encodes) in order. `workers` lanes decode and encode
        in rounds; otherwise `workers` decode threads work `ahead` batches ahead of the caller's encoder."""
        if lanes:
            per_round = round_size(workers, pp.batch_size, batches[0][0].bucket)

            def encode_read(got: tuple[list, list]) -> list | None:
                return encode(got[0]) if got[0] else None

            rounds = _in_rounds(batches, read, encode_read, workers, per_round)
            for batch, (decoded, bad), encoded in rounds:
                yield batch, decoded, bad, encoded
            return
        ahead = max(workers + 1, 2 * workers // pp.batch_size)  # batches decoded ahead: bounded memory
        for batch, (decoded, bad) in _in_order(batches, read, workers, ahead):
            yield batch, decoded, bad, None

    def store(decoded: list, encoded: list[dict[str, torch.Tensor]]) -> None:
        for (item, _, fps, _), tensors in zip(decoded, encoded, strict=True):
            metadata = {"fps": repr(fps), "video": item.src.rel, "format_version": str(CACHE_FORMAT_VERSION)}
            writer.put(latent_path(root, item.latent_key), tensors, metadata)
            fps_by_key[item.latent_key] = fps
            report.latents_encoded += 1

    with progress(total=len(todo), desc="VAE latents", unit="clip") as bar, _Writer() as writer:
        for bucket, group in by_bucket.items():
            lanes = cpu_lanes(device, bucket)
            workers = lane_count() if lanes else decode_workers(pp.num_workers)  # before the lanes' 1 thread
            batches = [group[i : i + pp.batch_size] for i in range(0, len(group), pp.batch_size)]
            with intra_op_threads(1 if lanes else None):
                for batch, decoded, bad, encoded in flow(batches, lanes, workers):
                    for item, why in bad:
                        on_bad(item, why)
                    if decoded:
                        store(decoded, encoded if encoded is not None else encode(decoded))
                    bar.update(len(batch))
    report.seconds["latents"] = time.perf_counter() - t1  # the encoding stage: decode, encode, write (overlapped)
    params = _param_count(vae, audio.vae if audio is not None else None)
    vae = audio = None  # the closures hold the names; dropping the references is what frees them
    _release_memory(params)
    return fps_by_key


@torch.inference_mode()
def decode_previews(cfg, root: Path, clips: list[CachedClip], device: str, dtype: torch.dtype, report: _Report):
    """One mp4 per clip, `<clip>_<W>x<H>x<F>.mp4`, decoded back from its cached latents. decoded/ shows the clips
    as the latest run that asked for previews trains on them: other previews (an old bucket, a removed clip) go."""
    from .preprocess import read_decoded_index

    index = read_decoded_index(root)
    wanted = {decoded_name(c.video, c.bucket): c for c in clips}
    todo = {
        name: c
        for name, c in wanted.items()
        if index.get(name) != c.latent_key or not (decoded_dir(root) / name).is_file()
    }
    if todo:
        fam = family(cfg.model)
        vae = fam.load_vae(cfg.model, dtype=dtype, device=device)
        if cfg.dataset.preprocessing.vae_tiling:
            vae.enable_tiling()
        for name, clip in progress(todo.items(), desc="decode previews", unit="clip"):
            latents = load_tensors(latent_path(root, clip.latent_key))["latents"][None].to(device, dtype)
            out = decoded_dir(root) / name
            tmp = out.with_name(f".{out.stem}.part.mp4")  # written aside and renamed: never a half mp4
            write_video(tmp, fam.decode_latents(vae, latents), clip.fps)
            tmp.replace(out)
            report.decoded += 1
        params = _param_count(vae)
        del vae
        _release_memory(params)
    for p in decoded_dir(root).iterdir():
        if p.is_file() and p.suffix == ".mp4" and not p.name.startswith(".") and p.name not in wanted:
            p.unlink()
            report.previews_removed += 1
    write_json_atomic(decoded_index_path(root), {name: c.latent_key for name, c in wanted.items()})

"""The cached latents/conditions of a preprocessing manifest, in bucket-pure, seeded, resumable batches.

The batch order is a pure function of (seed, epoch) indexed by a global "data position", so resuming needs only
that counter. A `DataLoader` reads the batches of the coming steps ahead (on a GPU in a worker process, while
the GPU computes); it is fed by this order and never re-sharded by `accelerator.prepare`, which is what keeps a
resumed run bit-identical.

Every cache file is checked when it is opened against the checksum preprocessing recorded in the manifest: a
file changed since (damaged, edited, overwritten) stops training naming it, and preprocessing encodes it again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError

from .cache import Manifest, condition_path, file_checksum, latent_path, load_tensors
from .errors import UserError


class CacheFileChanged(UserError):
    """A cache file that no longer holds what preprocessing wrote. Raised in a DataLoader worker (GPU runs read
    ahead in one), it comes back with the worker's traceback glued on by torch: only its own last line is kept."""

    def __init__(self, message: str):
        prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
        lines = [line for line in message.splitlines() if line.startswith(prefix)]
        super().__init__(lines[-1].removeprefix(prefix) if lines else message)


class CachedDataset:
    """The clips of a preprocessing manifest; `dataset[[i, j]]` loads one batch of them from the cache."""

    def __init__(self, manifest_path: Path, cfg):
        manifest_path = Path(manifest_path)
        if not manifest_path.is_file():
            raise UserError(f"{manifest_path}: manifest not found (run the preprocess stage first)")
        try:
            manifest = Manifest.from_json(json.loads(manifest_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{manifest_path}: not a valid manifest ({e}); run preprocessing again") from None
        if not manifest.clips:
            raise UserError(f"{manifest_path}: no usable clips in {cfg.dataset.data_folder} (see the preprocess log)")
        self.root, self.manifest_path = manifest_path.parent.parent, manifest_path
        self.clips = manifest.clips
        self.checksums, self.sizes = manifest.checksums, manifest.files
        self._check(manifest_path, {tuple(b) for b in cfg.dataset.resolution_buckets})

    def _check(self, manifest_path: Path, allowed: set[tuple]) -> None:
        problems = []
        for clip in self.clips:
            if tuple(clip.bucket) not in allowed:
                problems.append(f"{clip.video}: bucket {clip.bucket} is not in dataset.resolution_buckets")
            paths = [latent_path(self.root, clip.latent_key), condition_path(self.root, clip.condition_key)]
            if clip.reference_key:
                paths.append(latent_path(self.root, clip.reference_key))
            for path in paths:
                if not path.is_file():
                    problems.append(f"{clip.video}: cache file {path} is missing")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise UserError(
                f"{manifest_path}: the cache does not match this config: {'; '.join(problems[:3])}{more}; "
                "run the preprocess stage again"
            )

    def __len__(self) -> int:
        return len(self.clips)

    def bucket_groups(self) -> list[list[int]]:
        """Sample indices grouped by bucket, buckets in a fixed order."""
        groups: dict[tuple, list[int]] = {}
        for i, clip in enumerate(self.clips):  # LTX-2: clips with and without audio are never batched together
            key = (*clip.bucket, 1) if clip.audio_shape else tuple(clip.bucket)
            groups.setdefault(key, []).append(i)
        return [groups[k] for k in sorted(groups)]

    def embedding_width(self) -> tuple[Path, int]:
        path = condition_path(self.root, self.clips[0].condition_key)
        return path, self.load(path)["prompt_embeds"].shape[-1]

    def load(self, path: Path) -> dict[str, torch.Tensor]:
        """A cache file's tensors, after checking it holds what preprocessing wrote: the checksum the manifest
        recorded (the size, for a manifest older than checksums)."""
        rel = path.relative_to(self.root).as_posix()
        try:
            if rel in self.checksums:
                intact = file_checksum(path) == self.checksums[rel]
            else:
                intact = rel not in self.sizes or path.stat().st_size == self.sizes[rel]
            tensors = load_tensors(path) if intact else None
        except (OSError, SafetensorError):
            tensors = None  # unreadable (gone, truncated): answered like a changed file
        if tensors is None:
            raise CacheFileChanged(
                f"{path}: this cache file changed since preprocessing wrote it (it no longer matches "
                f"{self.manifest_path.name}); run the preprocess stage again (--only preprocess, or the same command "
                "without --only train): it encodes that file again"
            )
        return tensors

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """One batch on the CPU: latents [B, C, F, H, W], prompt_embeds, prompt_attention_mask, fps, and for IC-LoRA
        clips reference_latents [B, C, F, H, W], for LTX-2 clips with audio audio_latents [B, 8, T, 16]."""
        lat, emb, mask, fps, ref, audio = [], [], [], [], [], []
        for i in indices:
            clip = self.clips[i]
            stored = self.load(latent_path(self.root, clip.latent_key))
            lat.append(stored["latents"])
            if clip.audio_shape:
                audio.append(stored["audio_latents"])
            if clip.reference_key:
                ref.append(self.load(latent_path(self.root, clip.reference_key))["latents"])
            cond = self.load(condition_path(self.root, clip.condition_key))
            emb.append(cond["prompt_embeds"])
            mask.append(cond["prompt_attention_mask"])
            fps.append(float(clip.fps))
        batch = {
            "latents": torch.stack(lat),
            "prompt_embeds": torch.stack(emb),
            "prompt_attention_mask": torch.stack(mask),
            "fps": torch.tensor(fps),
        }
        if ref:
            batch["reference_latents"] = torch.stack(ref)
        if audio:
            batch["audio_latents"] = torch.stack(audio)
        return batch


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors to the training device. On CUDA through page-locked copies, so the transfer is queued
    without blocking the host (the caching host allocator keeps each buffer until its copy has run)."""
    if device.type == "cuda":
        return {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def epoch_batches(groups: list[list[int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch: every sample exactly once, batches never mix buckets, order fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    batches = []
    for group in groups:
        perm = [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
        batches += [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


class BatchOrder:
    """The endless batch stream epoch 0, epoch 1, ...; `at(position)` is the batch at a global position,
    so resuming needs nothing but the position counter."""

    def __init__(self, groups: list[list[int]], batch_size: int, seed: int):
        self.groups, self.batch_size, self.seed = groups, batch_size, seed
        self._epoch, self._batches = -1, []
        self.batches_per_epoch = sum(math.ceil(len(g) / batch_size) for g in groups)

    def at(self, position: int) -> list[int]:
        epoch, index = divmod(position, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.groups, self.batch_size, self.seed, epoch)
        return self._batches[index]


class _StepPositions(torch.utils.data.Sampler):
    """The batches this process reads, in step order: for each optimizer step from `first_step` to `steps`,
    one per micro-step, at position data_position + micro * world + rank (the data position advances by
    accumulation x world per step)."""

    def __init__(self, order: BatchOrder, data_position: int, first_step: int, steps: int, accum: int, rank, world):
        self.order, self.start, self.count = order, data_position, (steps - first_step) * accum
        self.accum, self.rank, self.world = accum, rank, world

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.count):
            step, micro = divmod(i, self.accum)
            yield self.order.at(self.start + step * self.accum * self.world + micro * self.world + self.rank)


def loader_workers(device: torch.device) -> int:
    """One reader process on a GPU (the reads overlap the GPU's work); none on a CPU, where the cores train."""
    return 1 if device.type == "cuda" else 0


def step_batches(
    data: CachedDataset, order: BatchOrder, data_position: int, first_step: int, steps: int, accum: int,
    rank: int, world: int, device: torch.device, workers: int | None = None,
) -> Iterator[list[dict[str, torch.Tensor]]]:  # fmt: skip
    """The micro-batches of each coming optimizer step, on the device, read ahead by a DataLoader."""
    workers = loader_workers(device) if workers is None else workers
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,  # the sampler yields whole batches (lists of indices)
        sampler=_StepPositions(order, data_position, first_step, steps, accum, rank, world),
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),  # its base seed must not come from the global RNG (resume)
    )
    micro: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        micro.append(batch_to_device(batch, device))
        if len(micro) == accum:
            yield micro
            micro = []

"""Stage 2: flow-matching training of the LTXV transformer (LoRA or full) through accelerate.

`train()` runs in this process (one device), or launches `accelerate launch -m ltxv_tuner.training` for
several processes and collects the result from the run folder. The loop (`_fit`) is one function; the
maths lives in small pure helpers (`pack_latents`, `sample_sigmas`, `flow_matching_loss`, ...), and the
single step (`training_step`) and model setup (`prepare_transformer`) can be imported by benchmarks.

Everything that decides what a step computes is a function of (seed, step, process) or of saved state,
so a resumed run continues bit for bit where the checkpoint left off:
- data order: a seeded permutation per epoch, indexed by a global "data position" counter;
- noise, timesteps, conditioning choice: a generator seeded from (seed, step, micro-step, process);
- weights, optimizer, LR scheduler and the global RNGs (dropout): accelerate save_state/load_state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoints as ckpts
from . import metrics
from .cache import Manifest, condition_path, latent_path, load_tensors, save_tensors_atomic, write_json_atomic
from .config import Config, load_config
from .errors import UserError

log = logging.getLogger("ltxv_tuner.training")  # not __name__: this module also runs as __main__

LOG_EVERY = 10  # optimizer steps between host syncs for loss/grad-norm logging (also at checkpoints and the end)
RESULT_FILE = "train_result.json"
TRAIN_LOG = "train.log"
SIGMA_STD = 1.0


@dataclass
class TrainResult:
    final_step: int
    checkpoints: list[Path] = field(default_factory=list)  # exported weight files of the kept checkpoints
    final_loss: float | None = None
    wall_time_s: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["checkpoints"] = [str(p) for p in self.checkpoints]
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainResult:
        return cls(d["final_step"], [Path(p) for p in d["checkpoints"]], d["final_loss"], d["wall_time_s"])


# --------------------------------------------------------------------------------------------------
# Pure helpers: the flow-matching maths


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, F*H*W, C], the token order of LTXPipeline (patch size 1)."""
    return latents.flatten(2).transpose(1, 2)


def timestep_shift(seq_len: int) -> float:
    """Mean of the logit-normal: linear in sequence length, 0.95 at 1024 tokens and 2.05 at 4096 (as LTXV trains)."""
    return 0.95 + (seq_len - 1024) * (2.05 - 0.95) / (4096 - 1024)


def sample_sigmas(
    batch_size: int, seq_len: int, generator: torch.Generator, shift: bool = True, std: float = SIGMA_STD
) -> torch.Tensor:
    """Noise levels in (0, 1): sigmoid of a normal whose mean grows with the sequence length (longer clips see
    more high-noise steps, where the overall structure is decided)."""
    mean = timestep_shift(seq_len) if shift else 0.0
    normal = torch.randn(batch_size, generator=generator, device=generator.device)
    return torch.sigmoid(normal * std + mean)


def first_frame_mask(
    batch_size: int, tokens_per_frame: int, seq_len: int, p: float, generator: torch.Generator
) -> torch.Tensor:
    """[B, seq] bool, True on the first latent frame's tokens of the samples drawn (with probability p) to train
    image-to-video: those tokens stay clean (timestep 0) and are left out of the loss."""
    chosen = torch.rand(batch_size, generator=generator, device=generator.device) < p
    positions = torch.arange(seq_len, device=generator.device)
    return chosen[:, None] & (positions < tokens_per_frame)[None, :]


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over tokens and channels; tokens where loss_mask is False do not count."""
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, seq]
    if loss_mask is None:
        return err.mean()
    weights = loss_mask.to(err.dtype)
    return (err * weights).sum() / weights.sum().clamp_min(1.0)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def training_step(transformer: torch.nn.Module, batch: dict, generator: torch.Generator, cfg: Config) -> torch.Tensor:
    """One flow-matching forward pass and its loss (no backward). `batch` is `load_batch`'s dict on the device;
    `generator` (on the same device) draws the noise levels, the noise and the image-to-video choice."""
    latents = batch["latents"]
    b, _, f, h, w = latents.shape
    seq_len = f * h * w
    x0 = pack_latents(latents.float())
    sigmas = sample_sigmas(b, seq_len, generator, shift=cfg.training.timestep_shift)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype)

    p = cfg.training.first_frame_conditioning_p
    cond = first_frame_mask(b, h * w, seq_len, p, generator) if p > 0 else None
    if cond is None:
        timestep = sigmas * 1000.0  # [B]: one noise level per sample
        s = sigmas[:, None, None]
    else:
        per_token = sigmas[:, None].expand(b, seq_len).masked_fill(cond, 0.0)  # clean first frame
        timestep = per_token * 1000.0  # [B, seq]
        s = per_token[..., None]
    x_t = (1.0 - s) * x0 + s * noise
    target = noise - x0

    dtype = _base_model(transformer).proj_in.weight.dtype
    fps_scale = (8.0 / batch["fps"]).to(device=x0.device, dtype=torch.float32).view(b, 1, 1, 1, 1)
    pred = transformer(
        hidden_states=x_t.to(dtype),
        encoder_hidden_states=batch["prompt_embeds"].to(dtype),
        timestep=timestep,
        encoder_attention_mask=batch["prompt_attention_mask"],
        num_frames=f,
        height=h,
        width=w,
        rope_interpolation_scale=(fps_scale, 32, 32),
        return_dict=False,
    )[0]
    return flow_matching_loss(pred, target, None if cond is None else ~cond)


def step_seed(seed: int, step: int, micro: int, process: int) -> int:
    """A distinct, reproducible seed per (run seed, optimizer step, micro-step, process)."""
    return (((seed * 1_000_003 + step) * 1_009 + micro) * 4_099 + process) % (2**63 - 1)


# --------------------------------------------------------------------------------------------------
# Data: the cached latents/conditions of a manifest, in bucket-pure, seeded, resumable batches


class CachedDataset:
    """The clips of a preprocessing manifest; loads latents and conditions from the cache on demand."""

    def __init__(self, manifest_path: Path, cfg: Config):
        manifest_path = Path(manifest_path)
        if not manifest_path.is_file():
            raise UserError(f"{manifest_path}: manifest not found (run the preprocess stage first)")
        try:
            manifest = Manifest.from_json(json.loads(manifest_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{manifest_path}: not a valid manifest ({e}); run preprocessing again") from None
        if not manifest.clips:
            raise UserError(f"{manifest_path}: no usable clips in {cfg.dataset.data_folder} (see the preprocess log)")
        self.root = manifest_path.parent.parent
        self.clips = manifest.clips
        allowed = {tuple(b) for b in cfg.dataset.resolution_buckets}
        problems = []
        for clip in self.clips:
            if tuple(clip.bucket) not in allowed:
                problems.append(f"{clip.video}: bucket {clip.bucket} is not in dataset.resolution_buckets")
            for path in (latent_path(self.root, clip.latent_key), condition_path(self.root, clip.condition_key)):
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
        for i, clip in enumerate(self.clips):
            groups.setdefault(tuple(clip.bucket), []).append(i)
        return [groups[k] for k in sorted(groups)]

    def load_batch(self, indices: list[int], device: torch.device | str) -> dict:
        device = torch.device(device)
        lat, emb, mask, fps = [], [], [], []
        for i in indices:
            clip = self.clips[i]
            lat.append(load_tensors(latent_path(self.root, clip.latent_key))["latents"])
            cond = load_tensors(condition_path(self.root, clip.condition_key))
            emb.append(cond["prompt_embeds"])
            mask.append(cond["prompt_attention_mask"])
            fps.append(float(clip.fps))
        batch = {
            "latents": torch.stack(lat),
            "prompt_embeds": torch.stack(emb),
            "prompt_attention_mask": torch.stack(mask),
            "fps": torch.tensor(fps),
        }
        return batch_to_device(batch, device)


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors to the training device. On CUDA through page-locked copies, so the transfer is queued
    without blocking the host (the caching host allocator keeps each buffer until its copy has run)."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
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


# --------------------------------------------------------------------------------------------------
# Model, optimizer, schedule


def _lora_base_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    # Frozen base weights can live in bf16 on a GPU (half the memory); trainable weights stay fp32.
    if cfg.model.training_mode == "lora" and device.type == "cuda" and cfg.training.mixed_precision_mode == "bf16":
        return torch.bfloat16
    return torch.float32


QUANT_PACKAGE = "torchao"  # optional: only acceleration.quantize_base: int8 needs it


def check_acceleration(cfg: Config) -> None:
    """Refuse acceleration options that are not implemented or cannot run here, before any work (never silently
    ignored)."""
    import importlib.util

    a = cfg.acceleration
    if a.quantize_base == "fp8":
        raise UserError(
            "acceleration.quantize_base: fp8 is not available yet (fp8 base weights are not implemented and need a "
            f"CUDA GPU); use none, or int8 (pip install {QUANT_PACKAGE})"
        )
    if a.quantize_base == "int8" and importlib.util.find_spec(QUANT_PACKAGE) is None:
        raise UserError(
            f"acceleration.quantize_base: int8 needs the {QUANT_PACKAGE} package, which is not installed "
            f"(venv/bin/pip install {QUANT_PACKAGE}, or set acceleration.quantize_base: none)"
        )
    if a.block_swap:
        raise UserError(
            f"acceleration.block_swap: {a.block_swap} is not available yet (swapping blocks between CPU and GPU is "
            "not implemented); use 0"
        )


def quantize_base_int8(transformer: torch.nn.Module, device: torch.device) -> int:
    """Replace the weights of the Linear layers inside the transformer blocks by int8 (per output row, symmetric,
    weight-only: activations and the matmul stay in the compute dtype). The blocks hold nearly all weights; the
    small input/output projections and embeddings stay as they are. Each layer moves to `device` just before it
    is quantized, so a base loaded on the CPU never sits on the GPU in bf16 as a whole. Deterministic: the same
    base weights give the same int8 weights (resume relies on it). Returns the number of quantized weights."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise UserError(
            f"acceleration.quantize_base: int8 needs a {QUANT_PACKAGE} with Int8WeightOnlyConfig ({e}); "
            f"venv/bin/pip install -U {QUANT_PACKAGE}"
        ) from None

    def in_block(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.")

    n = sum(m.weight.numel() for name, m in transformer.named_modules() if in_block(m, name))
    # set_inductor_config=False: leave torch.compile's global settings alone
    quantize_(transformer, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=in_block, device=device)
    return n


def enable_tf32(device: torch.device) -> None:
    """Let fp32 matmuls (ops outside autocast, or mixed_precision_mode: no) use TF32 tensor cores on CUDA.
    set_float32_matmul_precision sets torch's new fp32_precision API and keeps the legacy allow_tf32 getters
    readable (mixing the two setters makes torch raise on read)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def _ddp_skip_int8_weights(transformer: torch.nn.Module) -> None:
    """DDP broadcasts every parameter from process 0 when it wraps the model, and cannot broadcast torchao's int8
    tensors. Nor does it need to: every process quantizes the same base weights to the same int8 weights."""
    from torch.nn.parallel import DistributedDataParallel
    from torchao.utils import TorchAOBaseTensor

    names = [n for n, p in transformer.named_parameters() if isinstance(p, TorchAOBaseTensor)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(transformer, names)


def prepare_transformer(
    cfg: Config, device: torch.device | str = "cpu", transformer: torch.nn.Module | None = None
) -> torch.nn.Module:
    """The transformer ready to train: LoRA adapter added (only adapter weights train) or all weights trainable.

    `transformer`: an already built model (benchmarks build one from a shipped config with random weights);
    it is moved to the device and dtype training would have loaded it in. Default: load cfg.model."""
    from . import models

    device = torch.device(device)
    check_acceleration(cfg)
    enable_tf32(device)
    int8 = cfg.model.training_mode == "lora" and cfg.acceleration.quantize_base == "int8"
    if transformer is None:
        # int8: load on the CPU; quantize_base_int8 moves the layers over one at a time
        load_device = torch.device("cpu") if int8 else device
        transformer = models.load_transformer(cfg.model, dtype=_lora_base_dtype(cfg, device), device=load_device)
    else:
        dtype = _lora_base_dtype(cfg, device)
        transformer = transformer.to(device)
        if transformer.dtype != dtype:
            transformer = transformer.to(dtype)
    transformer.requires_grad_(False)
    if int8:
        n = quantize_base_int8(transformer, device)
        log.info("acceleration.quantize_base: int8: %.3g M block weights stored as int8", n / 1e6)
    torch.manual_seed(cfg.seed)  # LoRA A init (and anything else random at setup) follows the run's seed
    if cfg.model.training_mode == "lora":
        from peft import LoraConfig

        lora = cfg.lora
        peft_cfg = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            init_lora_weights=True,
        )
        try:
            with warnings.catch_warnings():
                # peft's LoRA on torchao weights warns that merging into the int8 base needs a re-quantization
                # recipe; training never merges (the LoRA is exported on its own).
                warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass", category=UserWarning)
                transformer.add_adapter(peft_cfg)
        except ValueError as e:
            raise UserError(
                f"lora.target_modules: {lora.target_modules} match no module of the transformer ({e}); "
                "use diffusers names such as to_q, to_k, to_v, to_out.0, ff.net.0.proj"
            ) from None
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if int8:
            _ddp_skip_int8_weights(transformer)
    else:
        transformer.requires_grad_(True)
    if cfg.training.enable_gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cfg.acceleration.compile:
        # Per block, in place (nn.Module.compile): parameter names stay as they are (no _orig_mod.), so
        # checkpoints, LoRA export and resume are unchanged; all blocks share one compiled graph.
        for block in transformer.transformer_blocks:
            block.compile()
    transformer.train()
    return transformer


def trainable_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in _base_model(transformer).named_parameters() if p.requires_grad}


def load_trainable_state_dict(transformer: torch.nn.Module, path: Path) -> None:
    saved = load_tensors(path)
    params = dict(_base_model(transformer).named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != wanted:
        missing, extra = sorted(wanted - set(saved)), sorted(set(saved) - wanted)
        raise UserError(
            f"{path}: trained weights do not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
            "resume with the config the run was started with"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device))


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.training
    if t.optimizer_type == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(
                "training.optimizer_type: adamw8bit needs bitsandbytes, which is not installed "
                "(pip install bitsandbytes, or set training.optimizer_type: adamw)"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=device.type == "cuda")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    from diffusers.optimization import get_scheduler

    t = cfg.training
    name = t.scheduler_type
    if name == "constant" and t.warmup_steps > 0:
        name = "constant_with_warmup"  # diffusers' "constant" ignores warmup
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps)


def resolve_mixed_precision(cfg: Config, cuda: bool) -> str:
    mode = cfg.training.mixed_precision_mode
    if mode == "fp16" and not cuda:
        log.warning("training.mixed_precision_mode: fp16 needs a GPU; training on the CPU with bf16 autocast instead")
        return "bf16"
    return mode


# --------------------------------------------------------------------------------------------------
# Logging and checkpoints


@contextlib.contextmanager
def _file_log(run_dir: Path, enabled: bool):
    """Send the package's log records to <run_dir>/logs/train.log (appending; the pipeline may add to it)."""
    if not enabled:
        yield
        return
    pkg = logging.getLogger("ltxv_tuner")
    if pkg.level == logging.NOTSET or pkg.level > logging.INFO:
        pkg.setLevel(logging.INFO)
    path = Path(run_dir) / "logs" / TRAIN_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in pkg.handlers):
        yield  # the pipeline already logs the run to this file
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        handler.close()


def _register_state_hooks(accelerator, model) -> None:
    """accelerate save_state/load_state carry only the trainable weights (not the frozen 13B base) as fp32."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            state = trainable_state_dict(accelerator.unwrap_model(models[0]))
            save_tensors_atomic(Path(output_dir) / ckpts.TRAINABLE_FILE, state)
        weights.clear()

    def load_hook(models, input_dir):
        load_trainable_state_dict(accelerator.unwrap_model(models.pop()), Path(input_dir) / ckpts.TRAINABLE_FILE)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _save_checkpoint(accelerator, model, cfg: Config, run_dir: Path, step: int, data_position: int) -> None:
    """Build checkpoints/.tmp_step_N/ (weights + full state) and rename it to step_N/ when complete."""
    from . import export

    tmp, final = ckpts.temp_checkpoint_dir(run_dir, step), ckpts.checkpoint_dir(run_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / ckpts.STATE_DIR))
    accelerator.wait_for_everyone()  # every process has written its RNG state before the folder is renamed
    if accelerator.is_main_process:
        transformer = accelerator.unwrap_model(model)
        weights = tmp / ckpts.weights_file_name(cfg.model.training_mode, step)
        if cfg.model.training_mode == "lora":
            export.save_lora(weights, transformer, cfg, step)
        else:
            export.save_full(weights, transformer, cfg, step)
        state = {
            "step": step,
            "data_position": data_position,
            "num_processes": accelerator.num_processes,
            "config": cfg.model_dump(mode="json"),
        }
        write_json_atomic(tmp / ckpts.STATE_DIR / ckpts.TRAINING_STATE_FILE, state)
        if final.exists():  # only when a run is re-trained over its own later steps; the new one wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        removed = ckpts.prune_checkpoints(run_dir, cfg.checkpoints.keep_last_n)
        log.info("checkpoint %s%s", final, f" (pruned {', '.join(p.name for p in removed)})" if removed else "")
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------
# The loop


def _fit(accelerator, cfg: Config, run_dir: Path, manifest_path: Path, resume_ckpt: Path | None) -> TrainResult:
    t0 = time.perf_counter()
    t = cfg.training
    device, main = accelerator.device, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    logs_dir = Path(run_dir) / "logs"
    metrics_path = logs_dir / metrics.METRICS_FILE

    data = CachedDataset(manifest_path, cfg)
    groups = data.bucket_groups()
    if main:
        for g in groups:
            if len(g) % t.batch_size:
                bucket = "x".join(map(str, data.clips[g[0]].bucket))
                log.warning(
                    "warning: bucket %s has %d clip(s), not a multiple of training.batch_size %d: one batch per "
                    "epoch has %d clip(s) (batches never mix buckets)", bucket, len(g), t.batch_size,
                    len(g) % t.batch_size,
                )  # fmt: skip
    order = BatchOrder(groups, t.batch_size, cfg.seed)
    model = prepare_transformer(cfg, device)
    _check_embedding_width(data, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, device)
    lr_scheduler = build_lr_scheduler(optimizer, cfg)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    _register_state_hooks(accelerator, model)
    n_trainable = sum(p.numel() for p in params)

    step, data_position = 0, 0
    if resume_ckpt is not None:
        state = ckpts.check_resume_compatible(resume_ckpt, cfg.model_dump(mode="json"))
        accelerator.load_state(str(resume_ckpt / ckpts.STATE_DIR))
        step, data_position = state["step"], state["data_position"]
        if main:
            metrics.truncate_metrics(metrics_path, step)
        log.info("resumed from %s at step %d", resume_ckpt, step)
    if main:
        ckpts.remove_temp_checkpoints(run_dir)
    log.info(
        "training %s: %d clips, %d trainable params, %d steps, batch %d x %d accumulation x %d processes, "
        "mixed precision %s, device %s",
        cfg.model.training_mode, len(data), n_trainable, t.steps, t.batch_size,
        t.gradient_accumulation_steps, world, accelerator.mixed_precision, accelerator.device,
    )  # fmt: skip

    from tqdm.auto import tqdm

    bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", disable=not main, dynamic_ncols=True)
    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
    interval = cfg.checkpoints.interval
    pending: list[dict] = []  # per-step records whose tensors are synced only at flush time
    final_loss, last_saved = None, None
    tick = time.perf_counter()
    while step < t.steps:
        samples, step_loss = 0, torch.zeros((), device=device)
        for micro in range(t.gradient_accumulation_steps):
            batch_ids = order.at(data_position + micro * world + rank)
            batch = data.load_batch(batch_ids, device)
            samples += len(batch_ids)
            generator = torch.Generator(device).manual_seed(step_seed(cfg.seed, step, micro, rank))
            last_micro = micro == t.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                loss = training_step(model, batch, generator, cfg)
                accelerator.backward(loss / t.gradient_accumulation_steps)
            step_loss += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(params, max_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        data_position += t.gradient_accumulation_steps * world

        now = time.perf_counter()
        pending.append(
            {
                "step": step,
                "loss": step_loss / t.gradient_accumulation_steps,
                "grad_norm": grad_norm,
                "lr": lr_scheduler.get_last_lr()[0],
                "s_per_step": now - tick,
                "samples_per_s": samples * world / max(now - tick, 1e-9),
            }
        )
        tick = now
        bar.update(1)
        checkpoint_now = step == t.steps or (interval is not None and step % interval == 0)
        if step % LOG_EVERY == 0 or checkpoint_now:
            final_loss = _flush_metrics(accelerator, pending, metrics_path, bar)
        if checkpoint_now:
            _save_checkpoint(accelerator, model, cfg, run_dir, step, data_position)
            last_saved = step
            if main:
                metrics.draw_loss_curve(metrics.read_metrics(metrics_path), logs_dir / metrics.LOSS_PNG)
            tick = time.perf_counter()  # saving is not a training step
        if cfg.validation.interval and step % cfg.validation.interval == 0:
            _validate(accelerator, model, cfg, run_dir, step)
            tick = time.perf_counter()
    bar.close()

    if last_saved != step and step > 0 and not ckpts.checkpoint_dir(run_dir, step).exists():
        _save_checkpoint(accelerator, model, cfg, run_dir, step, data_position)  # resumed past the last step
    if final_loss is None and main:
        rows = metrics.read_metrics(metrics_path)
        final_loss = rows[-1]["loss"] if rows else None
    result = TrainResult(step, ckpts.weight_files(run_dir), final_loss, time.perf_counter() - t0)
    if main:
        if rows := metrics.read_metrics(metrics_path):
            metrics.draw_loss_curve(rows, logs_dir / metrics.LOSS_PNG)
        write_json_atomic(logs_dir / RESULT_FILE, result.to_json())
        log.info(
            "training done: step %d, final loss %s, %.1f s, %d checkpoint file(s), newest %s",
            step, "n/a" if final_loss is None else f"{final_loss:.4g}", result.wall_time_s,
            len(result.checkpoints), result.checkpoints[-1] if result.checkpoints else "none",
        )  # fmt: skip
    return result


def _flush_metrics(accelerator, pending: list[dict], path: Path, bar) -> float | None:
    """One host sync for the losses/grad norms of the last few steps (averaged over processes), then log them."""
    if not pending:
        return None
    losses = accelerator.reduce(torch.stack([r["loss"] for r in pending]).float(), reduction="mean").tolist()
    norms = torch.stack([torch.as_tensor(r["grad_norm"]).float().reshape(()) for r in pending]).tolist()
    peak = metrics.peak_memory_mb(accelerator.device)
    rows = []
    for r, loss, norm in zip(pending, losses, norms, strict=True):
        rows.append({**r, "loss": loss, "grad_norm": norm, "peak_memory_mb": round(peak, 1)})
    pending.clear()
    if accelerator.is_main_process:
        metrics.append_metrics(path, rows)
        if accelerator.log_with:
            for row in rows:
                scalars = {f"train/{k}": v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
                accelerator.log(scalars, step=row["step"])
        last = rows[-1]
        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", s_step=f"{last['s_per_step']:.2f}")
        log.info(
            "step %d loss %.5f lr %.3e grad_norm %.3g %.3f s/step",
            last["step"], last["loss"], last["lr"], last["grad_norm"], last["s_per_step"],
        )  # fmt: skip
    return rows[-1]["loss"]


def _check_embedding_width(data: CachedDataset, model: torch.nn.Module) -> None:
    """Fail with a fix rather than a shape error deep inside the transformer."""
    path = condition_path(data.root, data.clips[0].condition_key)
    width = load_tensors(path)["prompt_embeds"].shape[-1]
    expected = _base_model(model).config.caption_channels
    if width != expected:
        raise UserError(
            f"{path}: caption embeddings are {width} wide but the transformer expects {expected}; "
            "the cache was made with another text encoder, run the preprocess stage again"
        )


def _validate(accelerator, model, cfg: Config, run_dir: Path, step: int) -> None:
    if accelerator.is_main_process:
        from . import validation

        validation.run_validation(cfg, accelerator.unwrap_model(model), run_dir, step)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------
# Entry points


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_tracker(cfg: Config) -> None:
    """training.report_to needs its package; say so before any work rather than at the first log line."""
    import importlib.util

    package = TRACKER_PACKAGES.get(cfg.training.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(
            f"training.report_to: {cfg.training.report_to} needs the {package} package, which is not installed "
            f"(venv/bin/pip install {package}, or set training.report_to: none)"
        )


def _tracker_config(cfg: Config) -> dict:
    """The run's settings as flat scalar hyperparameters (what TensorBoard/W&B can show)."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            key = prefix.rstrip(".")
            flat[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)

    walk("", cfg.model_dump(mode="json"))
    return flat


def _make_accelerator(cfg: Config, run_dir: Path | None = None):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mixed = resolve_mixed_precision(cfg, torch.cuda.is_available())
    tracker = None if cfg.training.report_to == "none" else cfg.training.report_to
    if tracker:
        check_tracker(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # cpu=True on a machine without CUDA: accelerate then joins several launched processes with gloo
        # (MULTI_CPU); without it each process would train alone as if it were the only one.
        accelerator = Accelerator(
            mixed_precision=mixed,
            step_scheduler_with_optimizer=False,
            cpu=not torch.cuda.is_available(),
            log_with=tracker,
            project_dir=str(Path(run_dir) / "logs") if run_dir is not None else None,
        )
    if tracker:
        # TensorBoard event files go to <run>/logs/<run folder name>/; W&B gets the run folder name as run name.
        name = Path(run_dir).name if run_dir is not None else "run"
        init_kwargs = {"wandb": {"name": name, "dir": str(Path(run_dir) / "logs")}} if tracker == "wandb" else {}
        accelerator.init_trackers(name, config=_tracker_config(cfg), init_kwargs=init_kwargs)
    set_seed(cfg.seed + accelerator.process_index)
    return accelerator


def _train_in_process(cfg: Config, run_dir: Path, manifest_path: Path, resume_from: Path | None) -> TrainResult:
    run_dir = Path(run_dir)
    resume_ckpt = ckpts.resolve_resume_checkpoint(resume_from) if resume_from is not None else None
    accelerator = _make_accelerator(cfg, run_dir)
    with _file_log(run_dir, accelerator.is_main_process):
        try:
            result = _fit(accelerator, cfg, run_dir, manifest_path, resume_ckpt)
        finally:
            accelerator.wait_for_everyone()
            accelerator.end_training()
            if accelerator.num_processes == 1:
                # accelerate keeps one global state per process; a later in-process run (tests, notebooks)
                # may want another mixed precision.
                from accelerate.state import AcceleratorState

                AcceleratorState._reset_state(reset_partial_state=True)
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_accelerate_config(path: Path) -> None:
    """Multi-GPU / multi-node data parallel is what the checkpoint hooks support; say so for anything else."""
    import yaml

    try:
        acc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"training.accelerate_config: {path} is not valid YAML ({e.__class__.__name__})") from None
    kind = str(acc.get("distributed_type", "")).upper() if isinstance(acc, dict) else ""
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA", "TPU"):
        raise UserError(
            f"training.accelerate_config: {path} asks for distributed_type {kind}, which is not supported yet "
            "(checkpoints and resume assume data parallel); use distributed_type: MULTI_GPU (also across machines)"
        )


def launch_command(cfg: Config, run_dir: Path, manifest_path: Path, resume_from: Path | None) -> list[str]:
    """The `accelerate launch` command line for a multi-process run of this module."""
    t = cfg.training
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if t.accelerate_config:
        if not Path(t.accelerate_config).is_file():
            raise UserError(f"training.accelerate_config: {t.accelerate_config} not found (give an accelerate YAML)")
        _check_accelerate_config(Path(t.accelerate_config))
        cmd += ["--config_file", t.accelerate_config]
        if t.num_processes:
            cmd += ["--num_processes", str(t.num_processes)]
    else:
        n = t.num_processes or max(1, torch.cuda.device_count())
        # --multi_gpu also gives real CPU processes (gloo) on a machine without GPUs; --cpu would run only one.
        cmd += ["--num_machines", "1", "--num_processes", str(n), "--dynamo_backend", "no"]
        cmd += ["--multi_gpu"] if n > 1 else []
        cmd += ["--main_process_port", str(_free_port())]
    cmd += ["--mixed_precision", resolve_mixed_precision(cfg, torch.cuda.is_available())]
    cmd += ["-m", "ltxv_tuner.training", "--config", str(Path(run_dir) / "config.yaml")]
    cmd += ["--run-dir", str(run_dir), "--manifest", str(manifest_path)]
    if resume_from is not None:
        cmd += ["--resume", str(resume_from)]
    return cmd


def _train_distributed(cfg: Config, run_dir: Path, manifest_path: Path, resume_from: Path | None) -> TrainResult:
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():  # the pipeline writes it; direct callers may not have
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(cfg.to_yaml(), encoding="utf-8")
    if resume_from is not None:
        ckpts.resolve_resume_checkpoint(resume_from)  # fail here, before starting processes
    result_file = run_dir / "logs" / RESULT_FILE
    result_file.unlink(missing_ok=True)
    cmd = launch_command(cfg, run_dir, manifest_path, resume_from)
    log.info("launching: %s", " ".join(cmd))
    env = {**os.environ, "LTXV_TUNER_LAUNCHED": "1"}
    rc = subprocess.run(cmd, env=env, check=False).returncode  # output streams live to the terminal
    if rc != 0:
        raise UserError(
            f"distributed training failed (exit code {rc}); see the output above and {run_dir / 'logs' / TRAIN_LOG}"
        )
    if not result_file.is_file():
        raise UserError(f"distributed training ended without writing {result_file}; see {run_dir / 'logs' / TRAIN_LOG}")
    return TrainResult.from_json(json.loads(result_file.read_text(encoding="utf-8")))


def wants_distributed(cfg: Config) -> bool:
    t = cfg.training
    return bool(t.distributed or t.accelerate_config) and os.environ.get("LTXV_TUNER_LAUNCHED") != "1"


def train(cfg: Config, run_dir: Path, manifest_path: Path, resume_from: Path | None = None) -> TrainResult:
    """Train on the manifest's cached clips; checkpoints, logs and metrics go to run_dir.

    resume_from: a run folder (or one of its checkpoints/step_* folders); training continues from its newest
    complete checkpoint with the same step count, data order and optimizer state."""
    check_acceleration(cfg)
    if wants_distributed(cfg):
        return _train_distributed(cfg, run_dir, manifest_path, resume_from)
    return _train_in_process(cfg, run_dir, manifest_path, resume_from)


run_training = train  # the name docs/DESIGN.md uses


def main(argv: list[str] | None = None) -> int:
    """Entry point of each process started by `accelerate launch` (and usable by hand)."""
    parser = argparse.ArgumentParser(prog="python -m ltxv_tuner.training", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's resolved config.yaml")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--resume", default=None, help="run folder to continue from")
    args = parser.parse_args(argv)
    from .pipeline import quiet_libraries

    quiet_libraries()  # each launched process would repeat diffusers' load-time warnings
    try:
        cfg = load_config(args.config)
        resume = Path(args.resume) if args.resume else None
        _train_in_process(cfg, Path(args.run_dir), Path(args.manifest), resume)
    except UserError as e:  # this process's edge: print the message for the launcher, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches every process; the launcher's parent says "interrupted" once
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

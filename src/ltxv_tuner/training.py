"""Stage 2: flow-matching training of the transformer (LoRA or full) through accelerate, in this process.

`train()` is the in-process trainer (one device, or one of the processes `launch.py` starts). It reads like
litgpt's recipe: `setup` builds everything (data, model, optimizer, schedule, resumed state), `fit` only loops,
`finish` writes the result. `optimizer_step` is the one step the loop and `benchmarks/train_step.py` both call;
`training_step` is its forward + loss, with the maths in `strategies/` and the model specifics in `models/`.

Everything that decides what a step computes is a function of (seed, step, process) or of saved state,
so a resumed run continues bit for bit where the checkpoint left off:
- data order: a seeded permutation per epoch, indexed by a global "data position" counter (`dataset.py`);
- noise, timesteps, conditioning choice: a generator seeded from (seed, step, micro-step, process);
- weights, optimizer, LR scheduler and the global RNGs (dropout): accelerate save_state/load_state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoints as ckpts
from . import metrics, models, sharding, strategies
from .cache import write_json_atomic
from .config import Config, shown
from .dataset import BatchOrder, CachedDataset, step_batches
from .errors import UserError
from .logs import progress, quiet_libraries, run_log
from .preflight import QUANT_PACKAGE, check_acceleration, check_tracker

log = logging.getLogger("ltxv_tuner.training")

LOG_EVERY = 10  # optimizer steps between host syncs for loss/grad-norm logging (also at checkpoints and the end)
RESULT_FILE = "train_result.json"


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
# One step


def step_seed(seed: int, step: int, micro: int, process: int) -> int:
    """A distinct, reproducible seed per (run seed, optimizer step, micro-step, process)."""
    return (((seed * 1_000_003 + step) * 1_009 + micro) * 4_099 + process) % (2**63 - 1)


def training_losses(transformer: torch.nn.Module, batch: dict, generator: torch.Generator, cfg: Config) -> dict:
    """One flow-matching forward pass and its loss (no backward): {"loss": ..., and per-modality parts where the
    family has several (LTX-2: loss_video, loss_audio)}. `batch`: a `CachedDataset` batch on the device;
    `generator` (on the same device) draws the noise levels, the noise and the strategy's random choices."""
    return models.family(cfg.model).training_losses(transformer, batch, generator, cfg, strategies.strategy(cfg))


def training_step(transformer: torch.nn.Module, batch: dict, generator: torch.Generator, cfg: Config) -> torch.Tensor:
    """The loss of `training_losses`."""
    return training_losses(transformer, batch, generator, cfg)["loss"]


def optimizer_step(
    accelerator, model, optimizer, lr_scheduler, params, micro_batches: list[dict], step: int, cfg, *, parts=None
):
    """One optimizer step over the step's micro-batches (gradient accumulation; gradients are synced across
    processes on the last one only), then clipping, the optimizer and the LR schedule.
    Returns (mean loss, grad norm) as device tensors: nothing here waits for the device. `parts`: a dict that
    receives the mean of each loss part (LTX-2: loss_video, loss_audio) as device tensors."""
    n = len(micro_batches)
    rank = accelerator.process_index
    step_loss = torch.zeros((), device=accelerator.device)
    no_sync = sharding.no_gradient_sync if sharding.is_sharded(model) else accelerator.no_sync
    for micro, batch in enumerate(micro_batches):
        generator = torch.Generator(accelerator.device).manual_seed(step_seed(cfg.seed, step, micro, rank))
        with contextlib.nullcontext() if micro == n - 1 else no_sync(model):
            losses = training_losses(model, batch, generator, cfg)
            accelerator.backward(losses["loss"] / n)
        step_loss += losses["loss"].detach()
        if parts is not None:
            for key, value in losses.items():  # nan (part absent in this micro-batch) is kept: see _reduce_parts
                if key != "loss":
                    parts[key] = parts.get(key, 0.0) + value.detach() / n
    max_norm = cfg.training.max_grad_norm if cfg.training.max_grad_norm > 0 else float("inf")
    grad_norm = sharding.local_tensor(accelerator.clip_grad_norm_(params, max_norm))  # sharded: replicated DTensor
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss / n, grad_norm


# --------------------------------------------------------------------------------------------------
# Model, optimizer, schedule, accelerator


def _lora_base_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    # Frozen base weights can live in bf16 on a GPU (half the memory); trainable weights stay fp32. Sharded: fp32
    # (FSDP2 gathers one dtype per block; sharding is what saves the memory there).
    lora, sharded = cfg.model.training_mode == "lora", cfg.training.sharding != "none"
    if lora and not sharded and device.type == "cuda" and cfg.training.mixed_precision_mode == "bf16":
        return torch.bfloat16
    return torch.float32


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


def _add_lora(transformer: torch.nn.Module, cfg: Config, int8: bool) -> None:
    """Only the adapter trains; its weights are fp32 whatever the base dtype."""
    from diffusers.training_utils import cast_training_params
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
    cast_training_params(transformer, dtype=torch.float32)
    if int8:
        _ddp_skip_int8_weights(transformer)


def prepare_transformer(
    cfg: Config, device: torch.device | str = "cpu", transformer: torch.nn.Module | None = None
) -> torch.nn.Module:
    """The transformer ready to train: LoRA adapter added (only adapter weights train) or all weights trainable.

    `transformer`: an already built model (benchmarks build one from a shipped config with random weights);
    it is moved to the device and dtype training would have loaded it in. Default: load cfg.model."""
    device = torch.device(device)
    enable_tf32(device)
    dtype = _lora_base_dtype(cfg, device)
    int8 = cfg.model.training_mode == "lora" and cfg.acceleration.quantize_base == "int8"
    if transformer is None:
        # int8: load on the CPU; quantize_base_int8 moves the layers over one at a time
        load_device = torch.device("cpu") if int8 else device
        transformer = models.family(cfg.model).load_transformer(cfg.model, dtype=dtype, device=load_device)
    else:
        transformer = transformer.to(device)
        if transformer.dtype != dtype:
            transformer = transformer.to(dtype)
    transformer.requires_grad_(False)
    if int8:
        n = quantize_base_int8(transformer, device)
        log.info("acceleration.quantize_base: int8: %.3g M block weights stored as int8", n / 1e6)
    torch.manual_seed(cfg.seed)  # LoRA A init (and anything else random at setup) follows the run's seed
    if cfg.model.training_mode == "lora":
        _add_lora(transformer, cfg, int8)
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
    fused = all(p.device.type == "cuda" for p in params)  # not for shards offloaded to the CPU (cpu_offload)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=fused)


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


def _ddp_kwargs(cfg: Config) -> list:
    """LTX-2: a step's batch without audio leaves the audio stream and the cross-modal attention without gradients
    on that process (and training.audio: off on every process); data parallel must not wait for them."""
    from accelerate.utils import DistributedDataParallelKwargs

    if models.family(cfg.model).PARAMETERS_MAY_GO_UNUSED:
        return [DistributedDataParallelKwargs(find_unused_parameters=True)]
    return []


def make_accelerator(cfg: Config, run_dir: Path | None = None):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mixed = resolve_mixed_precision(cfg, torch.cuda.is_available())
    tracker = None if cfg.training.report_to == "none" else cfg.training.report_to
    if tracker:
        check_tracker(cfg)
    if cfg.training.sharding == "fsdp":
        # training.py shards with fully_shard itself; an accelerate config with distributed_type FSDP launched the
        # processes, but accelerate must not also wrap the model with its own FSDP plugin.
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # cpu=True on a machine without CUDA: accelerate then joins several launched processes with gloo
        # (MULTI_CPU); without it each process would train alone as if it were the only one.
        accelerator = Accelerator(
            mixed_precision=mixed,
            kwargs_handlers=_ddp_kwargs(cfg),
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


# --------------------------------------------------------------------------------------------------
# setup -> fit -> finish


@dataclass
class Trainer:
    """Everything `fit` loops over, built once by `setup`."""

    accelerator: object
    cfg: Config
    run_dir: Path
    data: CachedDataset
    order: BatchOrder
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    params: list
    step: int = 0
    data_position: int = 0

    @property
    def metrics_path(self) -> Path:
        return Path(self.run_dir) / ckpts.LOGS_DIR / metrics.METRICS_FILE


def _warn_partial_batches(data: CachedDataset, groups: list[list[int]], batch_size: int) -> None:
    for g in groups:
        if len(g) % batch_size:
            bucket = "x".join(map(str, data.clips[g[0]].bucket))
            log.warning(
                "bucket %s has %d clip(s), not a multiple of training.batch_size %d: one batch per "
                "epoch has %d clip(s) (batches never mix buckets)", bucket, len(g), batch_size, len(g) % batch_size,
            )  # fmt: skip


def _check_embedding_width(data: CachedDataset, cfg: Config, model: torch.nn.Module) -> None:
    """Fail with a fix rather than a shape error deep inside the transformer."""
    path, width = data.embedding_width()
    expected = models.family(cfg.model).embedding_width(model)
    if width != expected:
        raise UserError(
            f"{path}: caption embeddings are {width} wide but the transformer expects {expected}; "
            "the cache was made with another text encoder, run the preprocess stage again"
        )


def _prepare_for_training(accelerator, cfg: Config, model: torch.nn.Module):
    """Data parallel: accelerate.prepare wraps the model (DDP) and the optimizer. Sharded: the blocks are sharded
    first (the optimizer must see the sharded parameters) and accelerate gets only the LR scheduler; the shards
    are saved per process by sharding's state hooks. Returns (model, optimizer, lr_scheduler, params)."""
    sharded = cfg.training.sharding == "fsdp"
    if sharded:
        model = sharding.shard_transformer(accelerator, model, cfg.training.cpu_offload)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, accelerator.device)
    lr_scheduler = build_lr_scheduler(optimizer, cfg)
    if sharded:
        lr_scheduler = accelerator.prepare(lr_scheduler)
        sharding.register_state_hooks(accelerator, model, optimizer)
    else:
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
        ckpts.register_state_hooks(accelerator)
    return model, optimizer, lr_scheduler, params


def setup(accelerator, cfg: Config, run_dir: Path, manifest_path: Path, resume_ckpt: Path | None) -> Trainer:
    """Data, model, optimizer and schedule, prepared by accelerate; the checkpoint's state restored if resuming."""
    t = cfg.training
    data = CachedDataset(manifest_path, cfg)
    groups = data.bucket_groups()
    if accelerator.is_main_process:
        _warn_partial_batches(data, groups, t.batch_size)
    model = prepare_transformer(cfg, accelerator.device)
    _check_embedding_width(data, cfg, model)
    model, optimizer, lr_scheduler, params = _prepare_for_training(accelerator, cfg, model)
    tr = Trainer(accelerator, cfg, run_dir, data, BatchOrder(groups, t.batch_size, cfg.seed), model, optimizer,
                 lr_scheduler, params)  # fmt: skip
    if resume_ckpt is not None:
        state = ckpts.load_checkpoint(accelerator, resume_ckpt, cfg.model_dump(mode="json"))
        ckpts.check_resume_data(resume_ckpt, state, ckpts.data_fingerprint(data.clips))
        tr.step, tr.data_position = state["step"], state["data_position"]
        if accelerator.is_main_process:
            metrics.truncate_metrics(tr.metrics_path, tr.step)
        log.info("resumed from %s at step %d", resume_ckpt, tr.step)
        _apply_resume_changes(tr, resume_ckpt, state)
    if accelerator.is_main_process:
        ckpts.remove_temp_checkpoints(run_dir)
    log.info(
        "training %s: %d clips, %d trainable params, %d steps, batch %d x %d accumulation x %d processes, "
        "mixed precision %s, device %s",
        cfg.model.training_mode, len(data), sum(p.numel() for p in params), t.steps, t.batch_size,
        t.gradient_accumulation_steps, accelerator.num_processes, accelerator.mixed_precision, accelerator.device,
    )  # fmt: skip
    return tr


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter's own shard; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


# Settings kept in the restored optimizer and LR scheduler state rather than read from the config at each use.
_OPTIMIZER_SETTINGS = ("learning_rate", "weight_decay", "steps", "scheduler_type", "warmup_steps")


def _apply_resume_changes(tr: Trainer, ckpt: Path, state: dict) -> None:
    """Settings changed since the checkpoint (those that may not change were refused before) apply from the next
    step, and one line says which. Most are read from the config where they are used; the learning rate and weight
    decay live in the restored optimizer and schedule state, so they are set here. The schedule's shape and length
    come from the config already (its functions are not saved), so only its current value is set again."""
    saved = state.get("config", {})
    changes = ckpts.resume_changes(saved, tr.cfg.model_dump(mode="json"))
    _note_schedule_change(tr, saved.get("training", {}))
    if any(key.removeprefix("training.") in _OPTIMIZER_SETTINGS for key, _, _ in changes):
        _set_optimizer_settings(tr)
    said = [f"{key} {shown(old)} -> {shown(new)}" for key, old, new in changes]
    saved_processes, processes = state.get("num_processes"), tr.accelerator.num_processes
    if saved_processes not in (None, processes):  # data parallel (a sharded checkpoint was refused)
        said.append(
            f"processes {saved_processes} -> {processes} (batches per step change with them; a process without a "
            "saved random state starts from the seed)"
        )
    if said:
        log.info(
            "resume: changed since %s, applied from step %d: %s; the optimizer's learning rate for step %d is %.3e",
            ckpt.name, tr.step + 1, "; ".join(said), tr.step + 1, tr.optimizer.param_groups[0]["lr"],
        )  # fmt: skip


def _set_optimizer_settings(tr: Trainer) -> None:
    """The configured peak learning rate and weight decay into the restored schedule and optimizer, and the LR of the
    coming step from the configured schedule (the restored value came from the old one)."""
    t = tr.cfg.training
    scheduler = getattr(tr.lr_scheduler, "scheduler", tr.lr_scheduler)  # accelerate's wrapper holds the real one
    scheduler.base_lrs = [t.learning_rate for _ in scheduler.base_lrs]
    for group, factor in zip(tr.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = t.learning_rate
        group["lr"] = t.learning_rate * factor(scheduler.last_epoch)
        group["weight_decay"] = t.weight_decay


def _note_schedule_change(tr: Trainer, saved: dict) -> None:
    """A resume with another length or shape of the LR schedule continues on the new one from the current step,
    which can make the LR jump (a finished linear schedule is at 0; stretched to more steps it is not). Say so,
    with the number metrics.jsonl will show."""
    t = tr.cfg.training
    changed = [
        f"training.{key} {saved[key]} -> {getattr(t, key)}"
        for key in ("steps", "scheduler_type", "warmup_steps")
        if key in saved and saved[key] != getattr(t, key)
    ]
    scheduler = getattr(tr.lr_scheduler, "scheduler", tr.lr_scheduler)
    before = scheduler.get_last_lr()[0]  # restored: the old schedule's
    after = t.learning_rate * scheduler.lr_lambdas[0](tr.step + 1)  # what the log shows after the next step
    if changed and abs(after - before) > 1e-12 + 1e-6 * abs(before):
        log.info(
            "note: %s since the checkpoint: the LR schedule now spans %d steps, so the LR jumps from %.3e at step %d "
            "to %.3e at step %d (metrics.jsonl)", "; ".join(changed), t.steps, before, tr.step, after, tr.step + 1,
        )  # fmt: skip


def _save(tr: Trainer) -> None:
    from . import export

    cfg, accelerator = tr.cfg, tr.accelerator
    lora = cfg.model.training_mode == "lora"
    # Finite losses and gradients can still overflow the weights: never export a non-finite weight file. Each
    # process checks its own (shards of the) weights; every process learns the verdict, so none waits for another.
    finite = torch.stack([_local(p).detach().isfinite().all() for p in tr.params]).all().float()
    if not bool(accelerator.reduce(finite, reduction="mean") == 1.0):
        raise NonFiniteError(
            f"training stopped at step {tr.step}: the trained weights are no longer finite numbers, so no checkpoint "
            "was written for it; lower training.learning_rate or use training.mixed_precision_mode: bf16"
        )
    gathered = None
    if sharding.is_sharded(tr.model):  # every process takes part in the gather; process 0 writes the file
        gathered = sharding.gather_state_dict(tr.model, (lambda n: "lora_" in n) if lora else (lambda n: True))

    def write_weights(folder: Path) -> None:
        transformer = accelerator.unwrap_model(tr.model)
        path = folder / ckpts.weights_file_name(cfg.model.training_mode, tr.step)
        save = export.save_lora if lora else export.save_full
        save(path, transformer, cfg, tr.step, state_dict=gathered)

    state = {
        "step": tr.step,
        "data_position": tr.data_position,
        "num_processes": accelerator.num_processes,
        "config": cfg.model_dump(mode="json"),
        "data": ckpts.data_fingerprint(tr.data.clips),
    }
    ckpts.save_checkpoint(accelerator, tr.run_dir, tr.step, state, write_weights, cfg.checkpoints.keep_last_n)


def _validate(tr: Trainer) -> None:
    if tr.accelerator.is_main_process:
        from . import validation

        validation.run_validation(tr.cfg, tr.accelerator.unwrap_model(tr.model), tr.run_dir, tr.step)
    tr.accelerator.wait_for_everyone()


def fit(tr: Trainer) -> tuple[float | None, int | None]:
    """The loop: optimizer steps until training.steps, with metrics, checkpoints and validation at their
    intervals. Returns (last logged loss, last saved step)."""
    cfg, t, accelerator = tr.cfg, tr.cfg.training, tr.accelerator
    world, main = accelerator.num_processes, accelerator.is_main_process
    bar = progress(total=t.steps, initial=tr.step, desc="train", unit="step", disable=not main, dynamic_ncols=True)
    batches = step_batches(tr.data, tr.order, tr.data_position, tr.step, t.steps, t.gradient_accumulation_steps,
                           accelerator.process_index, world, accelerator.device)  # fmt: skip
    pending: list[dict] = []  # per-step records whose tensors are synced only at flush time
    final_loss, last_saved = None, None
    tick = time.perf_counter()
    for micro_batches in batches:
        parts: dict = {}
        loss, grad_norm = optimizer_step(accelerator, tr.model, tr.optimizer, tr.lr_scheduler, tr.params,
                                         micro_batches, tr.step, cfg, parts=parts)  # fmt: skip
        tr.step += 1
        tr.data_position += t.gradient_accumulation_steps * world
        now = time.perf_counter()
        samples = sum(len(b["fps"]) for b in micro_batches)
        lr = tr.lr_scheduler.get_last_lr()[0]
        rate = samples * world / max(now - tick, 1e-9)
        pending.append({"step": tr.step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "s_per_step": now - tick,
                        "samples_per_s": rate, "parts": parts})  # fmt: skip
        tick = now
        bar.update(1)
        interval = cfg.checkpoints.interval
        checkpoint_now = tr.step == t.steps or (interval is not None and tr.step % interval == 0)
        validate_now = bool(cfg.validation.interval) and tr.step % cfg.validation.interval == 0
        # A flush is where non-finite losses/gradients are noticed: always before a checkpoint or a validation,
        # so weights that went NaN are never exported nor rendered.
        if tr.step % LOG_EVERY == 0 or checkpoint_now or validate_now:
            final_loss = _flush_metrics(accelerator, pending, tr.metrics_path, bar, last_saved)
        if checkpoint_now:
            _save(tr)
            last_saved = tr.step
            if main:
                metrics.draw_loss_curve(
                    metrics.read_metrics(tr.metrics_path), tr.metrics_path.with_name(metrics.LOSS_PNG)
                )
            tick = time.perf_counter()  # saving is not a training step
        if validate_now:
            _validate(tr)
            tick = time.perf_counter()
    if pending:  # the last steps since a flush (a resume at the final step has none)
        final_loss = _flush_metrics(accelerator, pending, tr.metrics_path, bar, last_saved)
    bar.close()
    return final_loss, last_saved


def finish(tr: Trainer, final_loss: float | None, last_saved: int | None, started: float) -> TrainResult:
    """The final checkpoint when the loop did not write one (resumed at the last step), the loss curve and
    train_result.json (how the launching process reads a multi-process run's result)."""
    main = tr.accelerator.is_main_process
    if last_saved != tr.step and tr.step > 0 and not ckpts.checkpoint_dir(tr.run_dir, tr.step).exists():
        _save(tr)
    rows = metrics.read_metrics(tr.metrics_path) if main else []
    if final_loss is None and rows:
        final_loss = rows[-1]["loss"]
    result = TrainResult(tr.step, ckpts.weight_files(tr.run_dir), final_loss, time.perf_counter() - started)
    if main:
        if rows:
            metrics.draw_loss_curve(rows, tr.metrics_path.with_name(metrics.LOSS_PNG))
        write_json_atomic(tr.metrics_path.with_name(RESULT_FILE), result.to_json())
        log.info(
            "training done: step %d, final loss %s, %.1f s, %d checkpoint file(s), newest %s",
            tr.step, "n/a" if final_loss is None else f"{final_loss:.4g}", result.wall_time_s,
            len(result.checkpoints), result.checkpoints[-1] if result.checkpoints else "none",
        )  # fmt: skip
    return result


class NonFiniteError(UserError):
    """The loss or the gradients stopped being finite numbers: the run stops, nothing of that step is exported."""


def non_finite_error(row: dict, last_saved: int | None) -> NonFiniteError:
    kept = f"the last good checkpoint is step {last_saved}" if last_saved else "no checkpoint was written"
    return NonFiniteError(
        f"training stopped at step {row['step']}: loss {row['loss']}, gradient norm {row['grad_norm']} (not finite); "
        f"no weights of this step were exported and {kept}. Likely causes: the learning rate "
        f"({row['lr']:.3g} at this step) too high, fp16 overflow (use training.mixed_precision_mode: bf16), "
        "or damaged cached latents (delete <data_folder>/.precomputed/); "
        "fix it and start again or resume with --resume latest"
    )


def _reduce_parts(accelerator, pending: list[dict]) -> list[dict]:
    """Per-step loss parts averaged over the processes whose batches had them (a family returns the same keys every
    step, nan where a batch lacks the part, e.g. audio); a part no process had is left out of the row."""
    keys = sorted({k for r in pending for k in r.get("parts", {})})
    if not keys:
        return [{} for _ in pending]
    values = torch.stack([torch.stack([torch.as_tensor(r["parts"][k]).float().reshape(()) for k in keys])
                          for r in pending])  # fmt: skip
    present = torch.isfinite(values)
    sums = accelerator.reduce(torch.where(present, values, torch.zeros_like(values)), reduction="sum")
    counts = accelerator.reduce(present.float(), reduction="sum")
    rows = (sums / counts.clamp_min(1)).tolist()
    return [{k: v for k, v, n in zip(keys, row, cnt, strict=True) if n > 0}
            for row, cnt in zip(rows, counts.tolist(), strict=True)]  # fmt: skip


def _flush_metrics(accelerator, pending: list[dict], path: Path, bar, last_saved: int | None = None) -> float | None:
    """One host sync for the losses/grad norms of the last few steps (averaged over processes), then log them.
    A non-finite loss or gradient norm (the same on every process: both are synced) stops the run naming its
    step, after the finite rows before it are written."""
    if not pending:
        return None
    losses = accelerator.reduce(torch.stack([r["loss"] for r in pending]).float(), reduction="mean").tolist()
    norms = torch.stack([torch.as_tensor(r["grad_norm"]).float().reshape(()) for r in pending]).tolist()
    part_values = _reduce_parts(accelerator, pending)
    peak = metrics.peak_memory_mb(accelerator.device)
    rows, bad = [], None
    for r, loss, norm, extra in zip(pending, losses, norms, part_values, strict=True):
        row = {**{k: v for k, v in r.items() if k != "parts"}, "loss": loss, "grad_norm": norm, **extra,
               "peak_memory_mb": round(peak, 1)}  # fmt: skip
        if not (math.isfinite(loss) and math.isfinite(norm)):
            bad = row
            break
        rows.append(row)
    pending.clear()
    if bad is not None:
        if accelerator.is_main_process and rows:
            metrics.append_metrics(path, rows)
        raise non_finite_error(bad, last_saved)
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


# --------------------------------------------------------------------------------------------------
# Entry


def train(cfg: Config, run_dir: Path, manifest_path: Path, resume_from: Path | None = None) -> TrainResult:
    """Train in this process on the manifest's cached clips; checkpoints, logs and metrics go to run_dir.

    resume_from: a run folder (or one of its checkpoints/step_* folders); training continues from its newest
    complete checkpoint with the same step count, data order and optimizer state.
    Several processes: `launch.train` starts this in each of them through `accelerate launch`."""
    check_acceleration(cfg)  # this is an entry point too (tests, notebooks, each launched process)
    quiet_libraries()
    run_dir = Path(run_dir)
    resume_ckpt = ckpts.resolve_resume_checkpoint(resume_from) if resume_from is not None else None
    started = time.perf_counter()
    accelerator = make_accelerator(cfg, run_dir)
    with run_log(run_dir, accelerator.is_main_process):
        try:
            tr = setup(accelerator, cfg, run_dir, manifest_path, resume_ckpt)
            result = finish(tr, *fit(tr), started)
        finally:
            accelerator.wait_for_everyone()
            accelerator.end_training()
            if accelerator.num_processes == 1:
                # accelerate keeps one global state per process; a later in-process run (tests, notebooks)
                # may want another mixed precision.
                from accelerate.state import AcceleratorState

                AcceleratorState._reset_state(reset_partial_state=True)
    return result


__all__ = ["QUANT_PACKAGE", "TrainResult", "check_tracker", "optimizer_step", "prepare_transformer", "train"]

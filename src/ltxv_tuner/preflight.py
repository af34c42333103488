"""Every check made before any work, in one place: `check()` runs them in order and returns what the stages
need (the resume target). A problem here costs seconds, not an encode or hours of training.

Also the rough peak-GPU-memory estimate: arithmetic on the transformer config (no weights are loaded) for
frozen/trainable weights, gradients, optimizer state and activations per token per layer. The activation
constants are rough (bf16, SDPA attention without an s^2 matrix), say so in the printout and err high.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoints as ckpts
from . import models
from .config import Config
from .errors import UserError

log = logging.getLogger("ltxv_tuner")

GIB = 1024**3
QUANT_PACKAGE = "torchao"  # optional: only acceleration.quantize_base: int8 needs it
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


@dataclass
class ResumeTarget:
    run_dir: Path
    checkpoint: Path
    step: int


def check(cfg: Config, only: str | None = None, resume: str | None = None) -> ResumeTarget | None:
    """All pre-work checks for a pipeline run (not `--only convert`, which needs none of them)."""
    if resume and only == "preprocess":
        raise UserError("--resume goes with training; drop it or drop --only preprocess")
    check_acceleration(cfg)  # an option that cannot run should not cost an encode first
    check_tracker(cfg)
    if cfg.training.accelerate_config and Path(cfg.training.accelerate_config).is_file():
        check_accelerate_config(Path(cfg.training.accelerate_config))
    output_dir = Path(cfg.output_dir).expanduser()
    if only != "preprocess" and not resume:
        ckpts.check_output_dir(output_dir)
    target = check_resume(resume, output_dir, cfg) if resume else None  # before an encode, too
    if only != "preprocess" and cfg.validation.interval:
        from .validation import load_images

        load_images(cfg)  # a missing first-frame image must not surface only at the first validation, hours in
    report_device(cfg)
    # The architecture from the config or a local file's header: a wrong file fails before any download or encode.
    report(cfg, models.family(cfg.model).architecture(cfg.model))
    warn_ineffective_settings(cfg)
    return target


def check_acceleration(cfg: Config) -> None:
    """Refuse acceleration options that are not implemented or cannot run here, before any work (never silently
    ignored)."""
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


def check_tracker(cfg: Config) -> None:
    """training.report_to needs its package; say so before any work rather than at the first log line."""
    package = TRACKER_PACKAGES.get(cfg.training.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(
            f"training.report_to: {cfg.training.report_to} needs the {package} package, which is not installed "
            f"(venv/bin/pip install {package}, or set training.report_to: none)"
        )


def check_accelerate_config(path: Path) -> None:
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


def check_resume(resume: str, output_dir: Path, cfg: Config) -> ResumeTarget:
    """The run folder and checkpoint to continue from; a missing or incompatible target is refused before anything
    is touched."""
    run_dir = ckpts.resolve_resume_run(resume, output_dir)
    ckpt = ckpts.resolve_resume_checkpoint(run_dir)
    done = ckpts.check_resume_compatible(ckpt, cfg.model_dump(mode="json")).get("step", 0)
    if done > cfg.training.steps:  # else the run's config.yaml would claim fewer steps than it has
        raise UserError(
            f"--resume: {ckpt} is at step {done}, past training.steps={cfg.training.steps}; "
            f"pass training.steps={done} (nothing more to train) or higher to train longer"
        )
    return ResumeTarget(run_dir, ckpt, done)


def warn_ineffective_settings(cfg: Config) -> None:
    """Settings that are valid but will not do what the user likely expects: say so before hours of work."""
    t, v, c = cfg.training, cfg.validation, cfg.checkpoints
    if v.interval is not None and v.interval > t.steps:
        log.warning(
            f"validation.interval {v.interval} > training.steps {t.steps}: no validation video will be made "
            f"(set validation.interval <= {t.steps})"
        )
    if c.interval is not None and c.interval > t.steps:
        log.info(f"note: checkpoints.interval {c.interval} > training.steps {t.steps}: only the final checkpoint")


def report_device(cfg: Config) -> list[str]:
    """Where training will run, said before any work. Without a GPU that is the CPU: fine for the tiny test model,
    far too slow for a real one, and a CPU-only torch (the default wheel on Windows) is the usual reason."""
    t = cfg.training
    lines = []
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        lines.append(f"preflight: {n} GPU(s) visible ({', '.join(names)}), torch {torch.__version__}")
    else:
        why = (
            "a CPU-only build of torch"
            if torch.version.cuda is None
            else f"torch is built for CUDA {torch.version.cuda} but sees no GPU (driver? CUDA_VISIBLE_DEVICES?)"
        )
        line = f"preflight: no GPU: training on the CPU ({why}, torch {torch.__version__})"
        if cfg.model.source.kind == "tiny":
            line += "; fine for the tiny test model"
        else:
            line += (
                "; a real LTXV model takes minutes to hours per step there: install a CUDA build of torch "
                "(docs/TRAINING.md#setup)"
            )
        lines.append(line)
        if t.mixed_precision_mode == "bf16":
            lines.append(
                'preflight: training.mixed_precision_mode bf16 on a CPU is emulated and usually slower than "no"'
            )
        if t.distributed and not t.num_processes and not t.accelerate_config:
            lines.append(
                "preflight: training.distributed with no GPU and training.num_processes null: one CPU process "
                "(set training.num_processes: N for N CPU processes)"
            )
    for line in lines:
        log.info(line)
    return lines


# --------------------------------------------------------------------------------------------------
# Sequence length and memory estimate


@dataclass
class MemoryEstimate:
    weights_gib: float
    trainable_gib: float  # trainable weights + grads + optimizer state
    activations_gib: float
    tokens: int

    @property
    def total_gib(self) -> float:
        # + ~10% for the allocator, cuBLAS workspaces and the CUDA context.
        return (self.weights_gib + self.trainable_gib + self.activations_gib) * 1.1


def _lora_params(tcfg: dict, rank: int, targets: list[str]) -> int:
    """LoRA parameter count for attention/feed-forward targets of every block (diffusers names)."""
    inner = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    cross = tcfg["cross_attention_dim"]
    shapes = {  # (in, out) of the Linear layers a LoRA usually targets, per block
        "to_q": [(inner, inner), (inner, inner)],
        "to_k": [(inner, inner), (cross, inner)],
        "to_v": [(inner, inner), (cross, inner)],
        "to_out.0": [(inner, inner), (inner, inner)],
        "ff.net.0.proj": [(inner, 4 * inner)],
        "ff.net.2": [(4 * inner, inner)],
    }
    per_block = sum(rank * (i + o) for t in targets for i, o in shapes.get(t, []))
    return per_block * tcfg["num_layers"]


def estimate_memory(cfg: Config, tcfg: dict, bucket: list[int], n_params: int) -> MemoryEstimate:
    tokens = models.family(cfg.model).sequence_length(*bucket) * cfg.training.batch_size
    h = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    layers = tcfg["num_layers"]
    bytes_w = {"none": 2, "int8": 1, "fp8": 1}[cfg.acceleration.quantize_base]
    adam = 2 if cfg.training.optimizer_type == "adamw8bit" else 8  # state bytes per trainable param
    if cfg.model.training_mode == "lora":
        weights = n_params * bytes_w
        n_train = _lora_params(tcfg, cfg.lora.rank, cfg.lora.target_modules)
    else:
        weights = 0
        n_train = n_params
    trainable = n_train * (4 + 4 + adam)  # fp32 weights + fp32 grads + optimizer state
    if cfg.acceleration.block_swap and cfg.model.training_mode == "lora":
        weights *= max(0.0, 1 - cfg.acceleration.block_swap / layers)
    # Activations kept for backward, bf16. Without checkpointing ~ (14 h + 3 * 4h) values per token and layer
    # (norms, q/k/v, attention out, residuals, the 4h feed-forward); with it one h per token per layer plus
    # one layer being recomputed.
    if cfg.training.enable_gradient_checkpointing:
        act = tokens * h * 2 * layers + tokens * (26 * h) * 2
    else:
        act = tokens * (26 * h) * 2 * layers
    return MemoryEstimate(weights / GIB, trainable / GIB, act / GIB, tokens)


def _size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def report(cfg: Config, tcfg: dict | None) -> list[str]:
    """Log one line per bucket; warn when the estimate exceeds the visible GPU. Returns the lines."""
    lines = []
    n_params = models.family(cfg.model).count_params(tcfg) if tcfg else None
    gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    for bucket in cfg.dataset.resolution_buckets:
        tokens = models.family(cfg.model).sequence_length(*bucket)
        line = f"preflight: bucket {bucket[0]}x{bucket[1]}x{bucket[2]}: {tokens} tokens"
        if n_params:
            est = estimate_memory(cfg, tcfg, bucket, n_params)
            line += (
                f", est. peak GPU memory {_size(est.total_gib)} (weights {_size(est.weights_gib)}, "
                f"trainable+optimizer {_size(est.trainable_gib)}, activations {_size(est.activations_gib)}; rough)"
            )
            if gpu is not None and est.total_gib * GIB > gpu.total_memory:
                line += (
                    f" - MORE than the {gpu.total_memory / GIB:.0f} GiB of {gpu.name}: enable "
                    "training.enable_gradient_checkpointing, acceleration.quantize_base, or smaller buckets "
                    "(see configs/low_vram_24gb.yaml)"
                )
        lines.append(line)
        log.info(line)
    return lines

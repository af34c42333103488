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

from . import checkpoints as ckpts
from . import models
from .config import Config
from .data import reference_bucket
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


def check_flags(only: str | None, resume: str | None, run_dir: str | None) -> None:
    """Command-line flags that would be ignored are refused (never silently dropped)."""
    if resume and only in ("preprocess", "convert"):
        raise UserError(f"--resume goes with training; drop it or drop --only {only}")
    if run_dir and only != "convert":
        raise UserError(
            f"--run-dir {run_dir} goes with --only convert; to continue training that run use --resume {run_dir}"
        )


def check(cfg: Config, only: str | None = None, resume: str | None = None) -> ResumeTarget | None:
    """All pre-work checks for a pipeline run (not `--only convert`, which needs none of them)."""
    check_settings(cfg, only, resume)
    models.family(cfg.model).check_config(cfg)  # what this model family cannot do (e.g. audio on LTXV)
    output_dir = Path(cfg.output_dir).expanduser()
    if only != "preprocess" and not resume:
        ckpts.check_output_dir(output_dir)
    target = check_resume(resume, output_dir, cfg) if resume else None  # before an encode, too
    if only != "preprocess" and cfg.validation.interval:
        from .validation import load_images

        load_images(cfg)  # a missing first-frame image must not surface only at the first validation, hours in
        if cfg.validation.reference_videos:
            from .ic_validation import read_reference, reference_dims

            for i, path in enumerate(cfg.validation.reference_videos):
                read_reference(path, reference_dims(cfg), i)
    report_device(cfg)
    # The architecture from the config or a local file's header: a wrong file fails before any download or encode.
    report(cfg, models.family(cfg.model).architecture(cfg.model))
    warn_ineffective_settings(cfg)
    return target


def check_settings(cfg: Config, only: str | None = None, resume: str | None = None) -> None:
    """The checks that need neither torch nor model code: flags, options that cannot run here, packages a setting
    needs. `--only preprocess` makes them before it looks at the cache; `check` makes them first."""
    check_flags(only, resume, None)
    models.facts(cfg.model).audio_mode(cfg)  # e.g. training.audio: on for a model without audio
    check_acceleration(cfg)  # an option that cannot run should not cost an encode first
    check_optimizer(cfg)
    check_tracker(cfg)
    if cfg.training.accelerate_config and Path(cfg.training.accelerate_config).is_file():
        check_accelerate_config(Path(cfg.training.accelerate_config), cfg)


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


def check_optimizer(cfg: Config) -> None:
    if cfg.training.optimizer_type == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "training.optimizer_type: adamw8bit needs bitsandbytes, which is not installed "
            "(venv/bin/pip install bitsandbytes, or set training.optimizer_type: adamw)"
        )


def check_tracker(cfg: Config) -> None:
    """training.report_to needs its package; say so before any work rather than at the first log line."""
    package = TRACKER_PACKAGES.get(cfg.training.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(
            f"training.report_to: {cfg.training.report_to} needs the {package} package, which is not installed "
            f"(venv/bin/pip install {package}, or set training.report_to: none)"
        )


def check_accelerate_config(path: Path, cfg: Config) -> None:
    """Data parallel (MULTI_GPU, also across machines) and FSDP go; FSDP only with training.sharding: fsdp, which
    does the sharding (fully_shard, see sharding.py): the file's fsdp_config must not ask for something else."""
    import yaml

    try:
        acc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"training.accelerate_config: {path} is not valid YAML ({e.__class__.__name__})") from None
    acc = acc if isinstance(acc, dict) else {}
    kind = str(acc.get("distributed_type", "")).upper()
    if kind in ("DEEPSPEED", "MEGATRON_LM", "XLA", "TPU"):
        raise UserError(
            f"training.accelerate_config: {path} asks for distributed_type {kind}, which is not supported "
            "(checkpoints and resume know data parallel and FSDP); use MULTI_GPU, or FSDP with training.sharding: fsdp"
        )
    if kind == "FSDP" and cfg.training.sharding != "fsdp":
        raise UserError(
            f"training.accelerate_config: {path} asks for distributed_type FSDP; set training.sharding: fsdp "
            "(it does the sharding), or use distributed_type: MULTI_GPU"
        )
    fsdp = acc.get("fsdp_config") or {}
    offload = str(fsdp.get("fsdp_offload_params", cfg.training.cpu_offload)).lower() == "true"
    if kind == "FSDP" and offload != cfg.training.cpu_offload:
        raise UserError(
            f"training.accelerate_config: {path} has fsdp_offload_params: {offload} but training.cpu_offload is "
            f"{cfg.training.cpu_offload}; set training.cpu_offload: {str(offload).lower()} (it is what is used)"
        )


def planned_processes(cfg: Config) -> int | None:
    """How many processes training will start (None: an accelerate config file without num_processes decides)."""
    import torch

    t = cfg.training
    if not (t.distributed or t.accelerate_config):
        return 1
    if t.num_processes or t.accelerate_config:
        return t.num_processes
    return max(1, torch.cuda.device_count())  # what launch.launch_command starts


def check_resume(resume: str, output_dir: Path, cfg: Config) -> ResumeTarget:
    """The run folder and checkpoint to continue from; a missing, damaged or incompatible target is refused before
    anything is touched."""
    run_dir, ckpt = ckpts.resolve_resume_target(resume, output_dir)
    state = ckpts.check_resume_compatible(ckpt, cfg.model_dump(mode="json"))
    if (n := planned_processes(cfg)) is not None:  # else each launched process checks it
        ckpts.check_process_count(ckpt, state, n)
    done = state.get("step", 0)
    if done > cfg.training.steps:  # else the run's config.yaml would claim fewer steps than it has
        raise UserError(
            f"--resume: {ckpt} is at step {done}, past training.steps={cfg.training.steps}; "
            f"pass training.steps={done} (nothing more to train) or higher to train longer"
        )
    return ResumeTarget(run_dir, ckpt, done)


def check_resume_data(target: ResumeTarget, manifest_path: Path) -> None:
    """After preprocessing, before any process starts: the data must be what the checkpoint was trained on."""
    from .cache import Manifest

    state = ckpts.read_training_state(target.checkpoint)
    ckpts.check_resume_data(target.checkpoint, state, ckpts.data_fingerprint(Manifest.read(manifest_path).clips))


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
    import torch

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
    """Per GPU (per process): sharded runs hold 1/processes of the weights and optimizer state."""

    weights_gib: float
    trainable_gib: float  # trainable weights + grads + optimizer state
    activations_gib: float
    tokens: int
    gathered_gib: float = 0.0  # sharded: whole blocks gathered for compute (this one, the next, its gradients)

    @property
    def total_gib(self) -> float:
        # + ~10% for the allocator, cuBLAS workspaces and the CUDA context.
        return (self.weights_gib + self.trainable_gib + self.activations_gib + self.gathered_gib) * 1.1


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


def reference_tokens(cfg: Config, bucket: list[int]) -> int:
    """Tokens of a clip's IC-LoRA reference (0 without one): its bucket / `dataset.reference_downscale`."""
    if cfg.training.strategy != "ic_lora":
        return 0
    return models.family(cfg.model).sequence_length(*reference_bucket(bucket, cfg.dataset.reference_downscale))


def transformer_tokens(cfg: Config, bucket: list[int]) -> int:
    """Tokens the transformer sees per clip: the clip's, and its IC-LoRA reference's."""
    return models.family(cfg.model).sequence_length(*bucket) + reference_tokens(cfg, bucket)


def estimate_memory(
    cfg: Config,
    tcfg: dict,
    bucket: list[int],
    n_params: int,
    processes: int = 1,
    sharding: str | None = None,
    frozen: int = 0,
) -> MemoryEstimate:
    """Peak memory of one GPU; `sharding` (default cfg.training.sharding) fsdp divides the weights, gradients and
    optimizer state by `processes` and adds the blocks gathered for compute. `frozen`: other weights every GPU
    holds while training (LTX-2's text connectors, in the compute dtype, never sharded)."""
    sharded = (sharding or cfg.training.sharding) == "fsdp"
    tokens = transformer_tokens(cfg, bucket) * cfg.training.batch_size
    h = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    layers = tcfg["num_layers"]
    bytes_w = 4 if sharded else {"none": 2, "int8": 1, "fp8": 1}[cfg.acceleration.quantize_base]  # sharded: fp32
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
    extra = frozen * (4 if cfg.training.mixed_precision_mode == "no" else 2)
    if not sharded:
        return MemoryEstimate((weights + extra) / GIB, trainable / GIB, act / GIB, tokens)
    keep = 0 if cfg.training.cpu_offload else 1 / max(1, processes)  # offloaded shards live in CPU memory
    gathered = 3 * (n_params / layers) * 4  # fp32 block being computed, the next one prefetched, its gradients
    return MemoryEstimate((weights * keep + extra) / GIB, trainable * keep / GIB, act / GIB, tokens, gathered / GIB)


def _size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def _too_big_advice(cfg: Config, tcfg: dict, bucket: list[int], n_params: int, gpu_bytes: float) -> str:
    """What to change when the estimate exceeds the GPU: for an unsharded full fine-tune, how many GPUs sharding
    needs (the optimizer state of a 13B full fine-tune alone is ~100 GiB)."""
    if cfg.model.training_mode == "full" and cfg.training.sharding == "none":
        for n in (2, 4, 8, 16, 32, 64):
            if estimate_memory(cfg, tcfg, bucket, n_params, n, "fsdp").total_gib * GIB <= gpu_bytes:
                return (
                    f"a full fine-tune of this model does not fit one GPU: set training.sharding: fsdp on {n} or "
                    f"more such GPUs (training.num_processes: {n}; see docs/TRAINING.md#sharded-training)"
                )
        return (
            "not even sharded over 64 such GPUs: enable training.enable_gradient_checkpointing, use smaller "
            "buckets, or train a LoRA"
        )
    if cfg.training.sharding == "fsdp" and not cfg.training.cpu_offload:
        return "training.cpu_offload: true, more processes, training.enable_gradient_checkpointing, or smaller buckets"
    return (
        "enable training.enable_gradient_checkpointing, acceleration.quantize_base, or smaller buckets "
        f"(see {models.family(cfg.model).LOW_VRAM_CONFIG})"
    )


def report(cfg: Config, tcfg: dict | None, gpu: tuple[str, float] | None = None) -> list[str]:
    """Log one line per bucket; warn when the estimate exceeds the GPU (`gpu`: (name, bytes), default the visible
    one). Returns the lines."""
    import torch

    lines = []
    fam = models.family(cfg.model)
    n_params = fam.count_params(tcfg) if tcfg else None
    frozen = fam.frozen_params(cfg.model) if tcfg else 0
    if gpu is None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = (props.name, props.total_memory)
    processes = planned_processes(cfg) or 1
    for bucket in cfg.dataset.resolution_buckets:
        tokens = transformer_tokens(cfg, bucket)
        line = f"preflight: bucket {bucket[0]}x{bucket[1]}x{bucket[2]}: {tokens} tokens"
        if cfg.training.strategy == "ic_lora":
            line += f" ({reference_tokens(cfg, bucket)} of them the reference's)"
        if n_params:
            est = estimate_memory(cfg, tcfg, bucket, n_params, processes, frozen=frozen)
            sharded = f", sharded over {processes} processes" if cfg.training.sharding == "fsdp" else ""
            line += (
                f", est. peak memory per GPU {_size(est.total_gib)} (weights {_size(est.weights_gib)}, "
                f"trainable+optimizer {_size(est.trainable_gib)}, activations {_size(est.activations_gib)}"
                f"{f', gathered blocks {_size(est.gathered_gib)}' if est.gathered_gib else ''}{sharded}; rough)"
            )
            if gpu is not None and est.total_gib * GIB > gpu[1]:
                advice = _too_big_advice(cfg, tcfg, bucket, n_params, gpu[1])
                line += f" - MORE than the {gpu[1] / GIB:.0f} GiB of {gpu[0]}: {advice}"
        lines.append(line)
        log.info(line)
    return lines

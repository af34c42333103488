"""Before any work: sequence length per bucket and a rough peak-GPU-memory estimate for the chosen options.

The estimate is arithmetic on the transformer config (no weights are loaded): frozen/trainable weights,
gradients, optimizer state, and activations per token per layer. The activation constants are rough
(bf16, SDPA attention without an s^2 matrix) and say so in the printout; they err on the high side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import Config

log = logging.getLogger("ltxv_tuner")

GIB = 1024**3


def sequence_length(width: int, height: int, frames: int) -> int:
    """Tokens the transformer sees for one clip: (W/32) * (H/32) * ((F-1)/8 + 1)."""
    return (width // 32) * (height // 32) * ((frames - 1) // 8 + 1)


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
    tokens = sequence_length(*bucket) * cfg.training.batch_size
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


def count_params(tcfg: dict) -> int:
    from diffusers import LTXVideoTransformer3DModel

    with torch.device("meta"):
        model = LTXVideoTransformer3DModel(**{k: v for k, v in tcfg.items() if not k.startswith("_")})
    return sum(p.numel() for p in model.parameters())


def _size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def report(cfg: Config, tcfg: dict | None) -> list[str]:
    """Log one line per bucket; warn when the estimate exceeds the visible GPU. Returns the lines."""
    lines = []
    n_params = count_params(tcfg) if tcfg else None
    gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    for bucket in cfg.dataset.resolution_buckets:
        tokens = sequence_length(*bucket)
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

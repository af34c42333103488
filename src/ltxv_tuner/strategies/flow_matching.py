"""Flow-matching maths shared by every training strategy (as LTXV and LTX-2 train).

x_t = (1 - s) * x0 + s * noise, the model predicts the velocity noise - x0, loss = MSE over the tokens that count.
Noise levels s come from a logit-normal whose mean grows with the sequence length (the model family's
scheduler shift): longer clips see more high-noise steps, where the overall structure is decided.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIGMA_STD = 1.0


@dataclass
class StepInputs:
    """What a strategy hands the transformer and the loss for one batch."""

    tokens: torch.Tensor  # [B, prepended + seq, C]: the transformer input
    timestep: torch.Tensor  # x1000, [B] or per token [B, prepended + seq]
    target: torch.Tensor  # [B, seq, C]: the velocity of the noised tokens
    loss_mask: torch.Tensor | None  # [B, seq] True where a token counts in the loss; None = all count
    prepended: int = 0  # clean tokens before the noised ones (IC-LoRA reference), never in the loss
    sigmas: torch.Tensor | None = None  # [B]: each sample's noise level (a family may noise other streams with it)


def sample_sigmas(batch_size: int, mean: float, generator: torch.Generator, std: float = SIGMA_STD) -> torch.Tensor:
    """Noise levels in (0, 1): sigmoid of a normal with this mean (the shift) and std; one per sample."""
    normal = torch.randn(batch_size, generator=generator, device=generator.device)
    return torch.sigmoid(normal * std + mean)


def noisy(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The point at noise level s on the straight path from the data x0 to the noise."""
    return (1.0 - s) * x0 + s * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict."""
    return noise - x0


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over tokens and channels; tokens where loss_mask is False do not count."""
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, seq]
    if loss_mask is None:
        return err.mean()
    weights = loss_mask.to(err.dtype)
    return (err * weights).sum() / weights.sum().clamp_min(1.0)

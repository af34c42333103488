"""The text-to-video strategy (image-to-video included): a training sample is one clip's latents and caption.

Every token is noised to the sample's noise level, except, with probability
`training.first_frame_conditioning_p`, the first latent frame: kept clean (timestep 0) and left out of the
loss, which teaches image-to-video conditioning (as LTX-Video-Trainer does). Nothing is prepended.

A clip of one latent frame (an image, bucket frames = 1) is never conditioned: its only frame would be both
given and excluded from the loss, leaving nothing to learn (LTX-Video-Trainer skips it the same way). This is
decided per batch (batches never mix buckets), so video buckets of the same run keep their conditioning.
"""

from __future__ import annotations

import torch

from .flow_matching import StepInputs, noisy, sample_sigmas, velocity


def first_frame_mask(
    batch_size: int, tokens_per_frame: int, seq_len: int, p: float, generator: torch.Generator
) -> torch.Tensor:
    """[B, seq] bool, True on the first latent frame's tokens of the samples drawn (with probability p) to train
    image-to-video: those tokens stay clean (timestep 0) and are left out of the loss."""
    chosen = torch.rand(batch_size, generator=generator, device=generator.device) < p
    positions = torch.arange(seq_len, device=generator.device)
    return chosen[:, None] & (positions < tokens_per_frame)[None, :]


def prepare(
    x0: torch.Tensor,
    tokens_per_frame: int,
    shift: float,
    generator: torch.Generator,
    training_cfg,
    reference=None,
    sampler=sample_sigmas,
) -> StepInputs:
    """Noised tokens, timesteps, target and loss mask for one batch of packed clean latents x0 [B, seq, C]
    (`reference` is not used by this strategy). `sampler(batch, mean, generator)` draws the noise levels (the model
    family's training distribution). The draws happen in a fixed order (noise levels, noise, conditioning choice):
    resume relies on it."""
    b, seq_len, _ = x0.shape
    sigmas = sampler(b, shift if training_cfg.timestep_shift else 0.0, generator)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype)
    p = training_cfg.first_frame_conditioning_p
    video = seq_len > tokens_per_frame  # one latent frame (an image): never conditioned
    cond = first_frame_mask(b, tokens_per_frame, seq_len, p, generator) if p > 0 and video else None
    if cond is None:
        timestep = sigmas * 1000.0  # [B]: one noise level per sample
        return StepInputs(noisy(x0, noise, sigmas[:, None, None]), timestep, velocity(x0, noise), None, sigmas=sigmas)
    per_token = sigmas[:, None].expand(b, seq_len).masked_fill(cond, 0.0)  # clean first frame
    timestep = per_token * 1000.0  # [B, seq]
    return StepInputs(noisy(x0, noise, per_token[..., None]), timestep, velocity(x0, noise), ~cond, sigmas=sigmas)


def prediction_for_loss(pred: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    """The part of the transformer's output the loss sees: the noised tokens (after any prepended ones)."""
    return pred[:, inputs.prepended :] if inputs.prepended else pred

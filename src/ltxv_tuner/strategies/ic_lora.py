"""IC-LoRA (in-context LoRA): control by a reference video (depth, pose, edges, any "before" video).

The clip is trained exactly as text-to-video (same noise levels, noise and first-frame conditioning draws), with
the reference clip's latents prepended as clean tokens: timestep 0, never noised, never in the loss. The model
sees the reference through attention only and learns to follow it. Positions are the model family's (`forward`
with `reference_grid`): LTXV 0.9.x puts the reference tokens on the target's grid (as Lightricks' trainer does);
LTX-2 on the reference's own grid, scaled up to the clip's size when `dataset.reference_downscale` > 1.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from . import text_to_video
from .flow_matching import StepInputs, sample_sigmas


def prepare(
    x0: torch.Tensor,
    tokens_per_frame: int,
    shift: float,
    generator: torch.Generator,
    training_cfg,
    reference=None,
    sampler=sample_sigmas,
) -> StepInputs:
    """`reference`: the packed clean reference latents [B, ref_seq, C] of the batch's clips."""
    if reference is None:
        raise UserError(
            "training.strategy ic_lora: the batch has no reference latents (the cache was made without "
            "dataset.reference_folder); run the preprocess stage again"
        )
    inputs = text_to_video.prepare(x0, tokens_per_frame, shift, generator, training_cfg, sampler=sampler)
    b, seq = x0.shape[:2]
    n_ref = reference.shape[1]
    timestep = inputs.timestep if inputs.timestep.ndim == 2 else inputs.timestep[:, None].expand(b, seq)
    clean = torch.zeros(b, n_ref, device=timestep.device, dtype=timestep.dtype)
    return StepInputs(
        tokens=torch.cat([reference.to(inputs.tokens.dtype), inputs.tokens], dim=1),
        timestep=torch.cat([clean, timestep], dim=1),
        target=inputs.target,
        loss_mask=inputs.loss_mask,
        prepended=n_ref,
        sigmas=inputs.sigmas,
    )


prediction_for_loss = text_to_video.prediction_for_loss

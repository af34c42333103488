"""Training strategies: what a training sample is - which tokens are prepended, which are kept clean, which
count in the loss. `text_to_video` (with image-to-video conditioning) is the one strategy today; IC-LoRA
(reference tokens prepended) is the next.

A strategy module provides:
    prepare(x0, tokens_per_frame, shift, generator, training_cfg) -> (tokens, timestep, target, loss_mask)
    prediction_for_loss(pred) -> the part of the transformer output compared with `target`
"""

from __future__ import annotations

from types import ModuleType

from . import text_to_video


def strategy(cfg) -> ModuleType:  # noqa: ARG001 - the IC-LoRA issue adds training.strategy here
    """The strategy module of `training.strategy` (one today)."""
    return text_to_video

"""Training strategies: what a training sample is - which tokens are prepended, which are kept clean, which
count in the loss: `text_to_video` (with image-to-video conditioning) and `ic_lora` (a reference video's clean
tokens prepended).

A strategy module provides:
    prepare(x0, tokens_per_frame, shift, generator, training_cfg, reference) -> flow_matching.StepInputs
    prediction_for_loss(pred, inputs) -> the part of the transformer output compared with inputs.target
"""

from __future__ import annotations

from types import ModuleType

from . import ic_lora, text_to_video


def strategy(cfg) -> ModuleType:
    """The strategy module of `training.strategy`."""
    return ic_lora if cfg.training.strategy == "ic_lora" else text_to_video

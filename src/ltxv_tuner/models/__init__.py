"""Model families: one module per family (`ltxv` = LTX-Video 0.9.x, `ltx2` = LTX-2 / 2.3 / 2.5), plus what all
families share (`sources`: what model.model_source names; `hub`: Hugging Face downloads; `single_file`: safetensors
headers).

A stage never branches on the family: it asks `family(cfg.model)` for the module that answers its questions.
Every family module provides the functions of `ModelFamily` (a module satisfies the protocol by having them).
Adding a family: see docs/DESIGN.md, "Adding a model family".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from .sources import ModelSource, named_versions, resolve

if TYPE_CHECKING:
    import torch


class ModelFamily(Protocol):
    """What the stages ask of a model family (module-level functions of models/<family>.py)."""

    PARAMETERS_MAY_GO_UNUSED: bool  # some trainable weights can sit out a step (data parallel must allow it)
    VALIDATION_PIPELINE: str  # what renders validation videos (recorded in their .txt)
    IC_VALIDATION_PIPELINE: str  # what renders IC-LoRA validation videos
    # IC-LoRA validation through the family's own pipeline (LTX-2), or None: ic_validation's sampler and `forward`
    # with `reference_grid` render it
    render_ic_validation: Callable | None
    LOW_VRAM_CONFIG: str  # the shipped preset for small GPUs

    # weights: each component from any source the family supports
    def load_transformer(self, model_cfg, dtype=None, device="cpu"): ...
    def load_vae(self, model_cfg, dtype=None, device="cpu"): ...
    def load_text_encoder(self, model_cfg, dtype=None, device="cpu"): ...
    def load_scheduler(self, model_cfg): ...
    # settings this family cannot honour, refused before any work
    def check_config(self, cfg) -> None: ...
    # cheap facts: cache-key identities, the transformer config without weights, metadata a base file carries
    def model_identity(self, model_cfg) -> dict: ...
    def architecture(self, model_cfg) -> dict: ...
    def count_params(self, tcfg: dict) -> int: ...
    def frozen_params(self, model_cfg) -> int: ...  # other weights on the GPU while training (LTX-2: connectors)
    def base_checkpoint_metadata(self, model_cfg) -> dict | None: ...
    def sequence_length(self, width: int, height: int, frames: int) -> int: ...
    def latent_shape(self, width: int, height: int, frames: int) -> list[int]: ...
    # preprocessing: normalised latents (and back, for previews), cached text features
    def encode_video(self, vae, pixels: torch.Tensor, posterior: str = "mode", seeds: list[int] | None = None): ...
    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor: ...
    def encode_captions(self, tokenizer, encoder, texts: list[str], max_len: int, device, encoding: str) -> tuple: ...
    # audio (LTX-2): "off" for a family without audio; the clip's log-mel and its latents
    def audio_mode(self, cfg) -> str: ...
    # training: tokens, noise-level shift, the forward, the losses of one batch ({"loss": ..., parts})
    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor: ...
    def scheduler_shift(self, seq_len: int) -> float: ...
    def forward(self, transformer, tokens, timestep, batch: dict, grid: tuple, reference_grid=None) -> torch.Tensor: ...
    def training_losses(self, transformer, batch: dict, generator, cfg, strategy) -> dict: ...
    def embedding_width(self, transformer) -> int: ...
    # validation: Lightricks' inference settings for the model, the noise levels to sample at, the pipeline
    def inference_settings(self, model_cfg) -> dict: ...
    def validation_sigmas(self, model_cfg, schedule, steps: int, seq_len: int) -> list[float]: ...
    def validation_pipeline(self, model_cfg, transformer, vae, tokenizer, text_encoder): ...
    def validation_texts(self, cfg, s: dict, tokenizer, text_encoder, prompt: str, device) -> dict: ...
    def render_validation(self, pipe, cfg, s: dict, texts: dict, image, generator) -> tuple: ...


def family(model_cfg) -> ModuleType:
    """The family module of `model.model_source` (resolved once per config)."""
    return importlib.import_module(f"{__name__}.{model_cfg.source.family}")


def facts(model_cfg) -> ModuleType:
    """The family's torch-free facts (`models/<family>_facts.py`: `model_identity`, `audio_mode`), which the family
    module re-exports: what a preprocessing run with nothing to encode asks without loading torch."""
    return importlib.import_module(f"{__name__}.{model_cfg.source.family}_facts")


# Every family, first the default one (a file whose names fit several is taken as the first's).
FAMILIES = ("ltxv", "ltx2")
FAMILY_METADATA_KEY = "ltxv_tuner.family"  # written by export.training_metadata into every weight file


def family_keys(name: str) -> ModuleType:
    """The key-name module of a family (`models/<family>_keys.py`): diffusers <-> original/ComfyUI names, how its
    ComfyUI LoRA carries alpha, the `config` metadata of its single files. Export and convert ask it; they never
    branch on the family's name."""
    return importlib.import_module(f"{__name__}.{name}_keys")


def keys_of_file(tensor_keys, metadata: dict | None = None) -> ModuleType:
    """The key-name module of the family a weight file belongs to: the family this tool wrote into its metadata,
    else the one whose distinct module names the file holds, else the default family."""
    named = (metadata or {}).get(FAMILY_METADATA_KEY)
    if named in FAMILIES:
        return family_keys(named)
    names = list(tensor_keys)
    for name in FAMILIES[1:]:
        if family_keys(name).is_family_file(names):
            return family_keys(name)
    return family_keys(FAMILIES[0])


__all__ = [
    "FAMILIES",
    "FAMILY_METADATA_KEY",
    "ModelFamily",
    "ModelSource",
    "family",
    "family_keys",
    "keys_of_file",
    "named_versions",
    "resolve",
]

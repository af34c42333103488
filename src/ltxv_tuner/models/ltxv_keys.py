"""Module names of the LTXV transformer in diffusers vs Lightricks' original layout (= ComfyUI's names).

Renames work on whole dotted name segments, never substrings, so a module that merely contains one of
these words is left alone. Used by model loading (single files), LoRA/full export and the converter.
"""

from __future__ import annotations

import json

# diffusers segment -> original/ComfyUI segment. Everything else (attn1.to_q, ff.net.0.proj,
# scale_shift_table, caption_projection, proj_out, ...) is named the same in both.
DIFFUSERS_TO_ORIGINAL = {
    "proj_in": "patchify_proj",
    "time_embed": "adaln_single",
    "norm_q": "q_norm",
    "norm_k": "k_norm",
}
ORIGINAL_TO_DIFFUSERS = {v: k for k, v in DIFFUSERS_TO_ORIGINAL.items()}

ORIGINAL_TRANSFORMER_PREFIX = "model.diffusion_model."  # Lightricks single files and ComfyUI full models
COMFY_LORA_PREFIX = "diffusion_model."  # ComfyUI LTXV LoRA keys
DIFFUSERS_LORA_PREFIX = "transformer."  # diffusers LoRA keys
COMPILE_PREFIX = "_orig_mod."  # torch.compile wrapper

# Top-level modules of the LTXV transformer, in each naming (what export/convert accept as an LTXV file).
DIFFUSERS_TOP = {"transformer_blocks", "proj_in", "time_embed", "caption_projection", "proj_out", "scale_shift_table"}
ORIGINAL_TOP = {DIFFUSERS_TO_ORIGINAL.get(n, n) for n in DIFFUSERS_TOP}
NOT_TRANSFORMER_TOP: frozenset[str] = frozenset()  # modules under the transformer prefix that are not the transformer
MODELSPEC_ARCHITECTURE = "ltx-video"  # sai model spec; LoRAs get the spec's "/lora" suffix
IMPLEMENTATION_ORIGINAL = "https://github.com/Lightricks/LTX-Video"  # ComfyUI uses Lightricks' naming
# ComfyUI's LTXV LoRA loader scales by a `.alpha` tensor / rank, so the twin keeps the factors as trained and carries
# alpha; ComfyUI's key map consumes `diffusion_model.<original module>.lora_A/B.weight` + `.alpha`.
FOLD_LORA_ALPHA = False


def transformer_class():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel


def _rename_segments(name: str, table: dict[str, str]) -> str:
    return ".".join(table.get(seg, seg) for seg in name.split("."))


def strip_compile_prefix(name: str) -> str:
    return ".".join(seg for seg in name.split(".") if seg != COMPILE_PREFIX.rstrip("."))


def diffusers_to_original(name: str) -> str:
    """`transformer_blocks.0.attn1.norm_q.weight` -> `transformer_blocks.0.attn1.q_norm.weight` (no prefix)."""
    return _rename_segments(strip_compile_prefix(name), DIFFUSERS_TO_ORIGINAL)


def original_to_diffusers(name: str) -> str:
    return _rename_segments(name, ORIGINAL_TO_DIFFUSERS)


# Lightricks single files carry a JSON `config` in their safetensors metadata; its "transformer" section uses these
# field names with the same meaning as diffusers' config. ComfyUI's checkpoint loader sizes an LTXV model from it
# (comfy/model_detection.py: without it, heads are assumed to be 32 of width/32).
LIGHTRICKS_TRANSFORMER_FIELDS = (
    "in_channels",
    "out_channels",
    "num_attention_heads",
    "attention_head_dim",
    "cross_attention_dim",
    "num_layers",
    "caption_channels",
)
LIGHTRICKS_CONFIG_KEY = "config"


def lightricks_config(diffusers_config: dict) -> str:
    """The Lightricks-style `config` metadata (JSON, a "transformer" section) of a transformer whose diffusers
    config is given."""
    section = {"_class_name": "Transformer3DModel"}
    section |= {k: diffusers_config[k] for k in LIGHTRICKS_TRANSFORMER_FIELDS if k in diffusers_config}
    return json.dumps({"transformer": section}, sort_keys=True)

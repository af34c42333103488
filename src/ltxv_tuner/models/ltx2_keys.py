"""Weight names of LTX-2 (2.0, 2.3, 2.5) in diffusers vs Lightricks' official single-file layout (ltx-core, ComfyUI).

An official 2.0/2.3 file holds, by key prefix:
    model.diffusion_model.*        the transformer (ltx-core `LTXModel` names), and inside it the two text connectors
                                   (`video_embeddings_connector`, `audio_embeddings_connector`)
    text_embedding_projection.*    the aggregate projection of the Gemma hidden states (2.0: `aggregate_embed`;
                                   2.3+: `video_aggregate_embed`, `audio_aggregate_embed`)
    vae.*, audio_vae.*, vocoder.*  the video VAE (with `per_channel_statistics`), the audio VAE, the vocoder
and a safetensors metadata `config` (JSON with "transformer", "vae", "audio_vae", "vocoder" sections).
2.5 ships one file per component with the same names (the VAE files may lack the `vae.` prefix).

diffusers splits the same weights into five models: `LTX2VideoTransformer3DModel` (transformer), `LTX2TextConnectors`
(connectors + aggregate projection), `AutoencoderKLLTX2Video`, `AutoencoderKLLTX2Audio`, `LTX2Vocoder(WithBWE)`.
The renames below are the ones diffusers' `scripts/convert_ltx2_to_diffusers.py` applies, done here on whole dotted
name segments (never substrings) so they run both ways; the names were checked against the modules ltx-core builds.
Everything not renamed (attn1.to_q, ff.net.0.proj, transformer_blocks, scale_shift_table, ...) is the same in both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from .ltxv_keys import COMPILE_PREFIX, strip_compile_prefix  # noqa: F401  (shared by every family's keys module)

OFFICIAL_TRANSFORMER_PREFIX = "model.diffusion_model."
ORIGINAL_TRANSFORMER_PREFIX = OFFICIAL_TRANSFORMER_PREFIX  # the name every family's keys module gives it
COMFY_LORA_PREFIX = "diffusion_model."  # the official trainer's LoRA files (ComfyUI reads the same)
DIFFUSERS_LORA_PREFIX = "transformer."
TEXT_PROJECTION_PREFIX = "text_embedding_projection."
COMPONENT_PREFIXES = {"vae": "vae.", "audio_vae": "audio_vae.", "vocoder": "vocoder."}
COMPONENTS = ("transformer", "connectors", "vae", "audio_vae", "vocoder")
LIGHTRICKS_CONFIG_KEY = "config"
MODELSPEC_ARCHITECTURE = "ltx-2"  # our label in modelspec.architecture (no registered sai id is known to us)
IMPLEMENTATION_ORIGINAL = "https://github.com/Lightricks/LTX-2"
# ltx-core (loader/fuse_loras.py) applies (B * strength) @ A and the official trainer writes no alpha: a twin in its
# format carries alpha/rank inside lora_B and has no `.alpha` keys (diffusers' LTX-2 LoRA loader refuses them).
FOLD_LORA_ALPHA = True

# --------------------------------------------------------------------------------------------------
# Transformer: diffusers segment -> official segment

TRANSFORMER_DIFFUSERS_TO_OFFICIAL = {
    "proj_in": "patchify_proj",
    "audio_proj_in": "audio_patchify_proj",
    "time_embed": "adaln_single",
    "audio_time_embed": "audio_adaln_single",
    "prompt_adaln": "prompt_adaln_single",  # 2.3+
    "audio_prompt_adaln": "audio_prompt_adaln_single",
    "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
    "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
    "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
    "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
    "video_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_video",
    "audio_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_audio",
    "norm_q": "q_norm",
    "norm_k": "k_norm",
}
TRANSFORMER_OFFICIAL_TO_DIFFUSERS = {v: k for k, v in TRANSFORMER_DIFFUSERS_TO_OFFICIAL.items()}

# Top-level modules of the transformer in each naming (what export/convert accept as an LTX-2 transformer file).
DIFFUSERS_TOP = {
    "transformer_blocks", "proj_in", "time_embed", "caption_projection", "proj_out", "scale_shift_table",
    "audio_proj_in", "audio_time_embed", "audio_caption_projection", "audio_proj_out", "audio_scale_shift_table",
    "av_cross_attn_video_scale_shift", "av_cross_attn_audio_scale_shift", "av_cross_attn_video_a2v_gate",
    "av_cross_attn_audio_v2a_gate", "prompt_adaln", "audio_prompt_adaln", "keyframes_abs_pos_embedding",
}  # fmt: skip
ORIGINAL_TOP = {TRANSFORMER_DIFFUSERS_TO_OFFICIAL.get(n, n) for n in DIFFUSERS_TOP}

_CONNECTOR_SUBTREES = {"video_embeddings_connector": "video_connector", "audio_embeddings_connector": "audio_connector"}
NOT_TRANSFORMER_TOP = frozenset(_CONNECTOR_SUBTREES)  # under model.diffusion_model. but diffusers' connectors
_CONNECTOR_DIFFUSERS_TO_OFFICIAL = {
    "transformer_blocks": "transformer_1d_blocks",
    "norm_q": "q_norm",
    "norm_k": "k_norm",
}
_PROJECTION_DIFFUSERS_TO_OFFICIAL = {
    "text_proj_in": "aggregate_embed",  # 2.0: one projection for both modalities
    "video_text_proj_in": "video_aggregate_embed",  # 2.3+: per modality
    "audio_text_proj_in": "audio_aggregate_embed",
}


def _rename(name: str, table: dict[str, str]) -> str:
    return ".".join(table.get(seg, seg) for seg in name.split("."))


def diffusers_to_original(name: str) -> str:
    """Transformer module/weight name, diffusers -> official (no prefix): `proj_in.weight` -> `patchify_proj.weight`."""
    return _rename(strip_compile_prefix(name), TRANSFORMER_DIFFUSERS_TO_OFFICIAL)


def original_to_diffusers(name: str) -> str:
    return _rename(name, TRANSFORMER_OFFICIAL_TO_DIFFUSERS)


# --------------------------------------------------------------------------------------------------
# Connectors (+ aggregate projection)


def connectors_to_official(name: str) -> str:
    """`video_connector.transformer_blocks.0.attn1.norm_q.weight` ->
    `model.diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.q_norm.weight`."""
    head, _, rest = name.partition(".")
    if head in _PROJECTION_DIFFUSERS_TO_OFFICIAL:
        return f"{TEXT_PROJECTION_PREFIX}{_PROJECTION_DIFFUSERS_TO_OFFICIAL[head]}.{rest}"
    subtree = {v: k for k, v in _CONNECTOR_SUBTREES.items()}[head]
    return f"{OFFICIAL_TRANSFORMER_PREFIX}{subtree}.{_rename(rest, _CONNECTOR_DIFFUSERS_TO_OFFICIAL)}"


def _connectors_to_diffusers(key: str) -> str | None:
    if key.startswith(TEXT_PROJECTION_PREFIX):
        head, _, rest = key.removeprefix(TEXT_PROJECTION_PREFIX).partition(".")
        table = {v: k for k, v in _PROJECTION_DIFFUSERS_TO_OFFICIAL.items()}
        return f"{table[head]}.{rest}" if head in table else None
    head, _, rest = key.removeprefix(OFFICIAL_TRANSFORMER_PREFIX).partition(".")
    if not key.startswith(OFFICIAL_TRANSFORMER_PREFIX) or head not in _CONNECTOR_SUBTREES:
        return None
    back = {v: k for k, v in _CONNECTOR_DIFFUSERS_TO_OFFICIAL.items()}
    return f"{_CONNECTOR_SUBTREES[head]}.{_rename(rest, back)}"


# --------------------------------------------------------------------------------------------------
# Video VAE: ltx-core numbers the encoder's and decoder's blocks in one flat list (res groups and resamplers
# alternating); diffusers nests each resampler in the block it follows (encoder) or precedes (decoder).

_STATS = {"latents_mean": "per_channel_statistics.mean-of-means", "latents_std": "per_channel_statistics.std-of-means"}
_VAE_DECODER_TOP = {"time_embedder": "last_time_embedder", "scale_shift_table": "last_scale_shift_table"}


def _vae_block_to_official(part: str, rest: str, has_resampler: dict[tuple[str, int], bool]) -> str:
    """`down_blocks.1.downsamplers.0.conv...` -> `down_blocks.3.conv...` (the decoder counts from 1: its mid block
    is up_blocks.0, and each up block's upsampler comes before its res group)."""
    segs = rest.split(".")
    kind, resampler = ("down_blocks", "downsamplers") if part == "encoder" else ("up_blocks", "upsamplers")
    blocks = sorted(k for p, k in has_resampler if p == part)
    start = 0 if part == "encoder" else 1

    def flat_start(k: int) -> int:
        return start + sum(1 + has_resampler[(part, j)] for j in blocks if j < k)

    if segs[0] == "mid_block":
        index = flat_start(len(blocks)) if part == "encoder" else 0
        return ".".join([kind, str(index), *segs[1:]])
    k = int(segs[1])
    has = has_resampler[(part, k)]
    if len(segs) > 3 and segs[2] == resampler:
        index = flat_start(k) + 1 if part == "encoder" else flat_start(k)
        return ".".join([kind, str(index), *segs[4:]])
    index = flat_start(k) if part == "encoder" else flat_start(k) + has
    return ".".join([kind, str(index), *segs[2:]])


def vae_to_official(names: Iterable[str]) -> dict[str, str]:
    """{diffusers name: official key (with `vae.`)} for a video VAE's state dict names."""
    names = list(names)
    has: dict[tuple[str, int], bool] = {}
    for n in names:
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(\w+)", n):
            key = (m.group(1), int(m.group(3)))
            has[key] = has.get(key, False) or m.group(4) in ("downsamplers", "upsamplers")
    out = {}
    for n in names:
        if n in _STATS:
            out[n] = "vae." + _STATS[n]
            continue
        part, _, rest = n.partition(".")
        top = rest.split(".")[0]
        if top in ("down_blocks", "up_blocks", "mid_block"):
            rest = _vae_block_to_official(part, rest, has)
        elif part == "decoder" and top in _VAE_DECODER_TOP:
            rest = _rename(rest, {top: _VAE_DECODER_TOP[top]})
        out[n] = f"vae.{part}.{_rename(rest, {'resnets': 'res_blocks'})}"
    return out


def _vae_official_to_diffusers(keys: list[str]) -> dict[str, str]:
    """{diffusers name: official key} for the `vae.` part of an official file (unknown statistics left out)."""
    groups: dict[tuple[str, int], bool] = {}  # (part, flat index) -> is a res group
    for k in keys:
        if m := re.match(r"vae\.(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(\w+)", k):
            key = (m.group(1), int(m.group(2)))
            groups[key] = groups.get(key, False) or m.group(3) == "res_blocks"
    table: dict[tuple[str, int], str] = {}
    for part in ("encoder", "decoder"):
        flat = sorted(i for p, i in groups if p == part)
        block, last = 0, max(flat, default=-1)
        for i in flat:
            is_res = groups[(part, i)]
            if part == "encoder":
                if is_res and i == last:
                    table[(part, i)] = "mid_block"
                elif is_res:
                    table[(part, i)] = f"down_blocks.{block}"
                else:
                    table[(part, i)], block = f"down_blocks.{block}.downsamplers.0", block + 1
            elif i == 0:
                table[(part, i)] = "mid_block"
            elif is_res:
                table[(part, i)], block = f"up_blocks.{block}", block + 1
            else:
                table[(part, i)] = f"up_blocks.{block}.upsamplers.0"
    back_stats = {v: k for k, v in _STATS.items()}
    back_top = {v: k for k, v in _VAE_DECODER_TOP.items()}
    out = {}
    for k in keys:
        rest = k.removeprefix("vae.")
        if rest.startswith("per_channel_statistics."):
            if rest in back_stats:
                out[back_stats[rest]] = k
            continue
        part, _, inner = rest.partition(".")
        if m := re.match(r"(?:down|up)_blocks\.(\d+)\.(.*)", inner):
            inner = f"{table[(part, int(m.group(1)))]}.{m.group(2)}"
        elif part == "decoder":
            inner = _rename(inner, back_top)
        out[f"{part}.{_rename(inner, {'res_blocks': 'resnets'})}"] = k
    return out


# --------------------------------------------------------------------------------------------------
# Audio VAE and vocoder

_VOCODER_DIFFUSERS_TO_OFFICIAL = {
    "upsamplers": "ups",
    "resnets": "resblocks",
    "conv_in": "conv_pre",
    "conv_out": "conv_post",
    "act_out": "act_post",
}


def audio_vae_to_official(name: str) -> str:
    return "audio_vae." + _STATS.get(name, name)


def vocoder_to_official(name: str) -> str:
    # 2.3+ anti-aliased activations: diffusers keeps the low-pass filter directly under `downsample`.
    renamed = _rename(name, _VOCODER_DIFFUSERS_TO_OFFICIAL).replace(".downsample.filter", ".downsample.lowpass.filter")
    return "vocoder." + renamed


def _vocoder_to_diffusers(key: str) -> str:
    name = key.removeprefix("vocoder.").replace(".downsample.lowpass.", ".downsample.")
    return _rename(name, {v: k for k, v in _VOCODER_DIFFUSERS_TO_OFFICIAL.items()})


# --------------------------------------------------------------------------------------------------
# Whole files


def to_official(component: str, names: Iterable[str]) -> dict[str, str]:
    """{diffusers name: official key} for the state dict names of one diffusers component."""
    names = list(names)
    if component == "transformer":
        return {n: OFFICIAL_TRANSFORMER_PREFIX + diffusers_to_original(n) for n in names}
    if component == "connectors":
        return {n: connectors_to_official(n) for n in names}
    if component == "vae":
        return vae_to_official(names)
    if component == "audio_vae":
        return {n: audio_vae_to_official(n) for n in names}
    if component == "vocoder":
        return {n: vocoder_to_official(n) for n in names}
    raise ValueError(f"unknown LTX-2 component {component!r} (one of {COMPONENTS})")


def _strip_known(key: str, prefix: str) -> str | None:
    return key.removeprefix(prefix) if key.startswith(prefix) else None


def to_diffusers(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """{component: {diffusers name: official key}} for the keys of an official single file. Keys that belong to no
    diffusers component (the latent statistics diffusers does not keep, a 2.5 duration head, ...) are left out."""
    out: dict[str, dict[str, str]] = {c: {} for c in COMPONENTS}
    vae_keys = []
    for key in keys:
        if (name := _connectors_to_diffusers(key)) is not None:
            out["connectors"][name] = key
        elif (rest := _strip_known(key, OFFICIAL_TRANSFORMER_PREFIX)) is not None:
            out["transformer"][original_to_diffusers(rest)] = key
        elif key.startswith("vae."):
            vae_keys.append(key)
        elif (rest := _strip_known(key, "audio_vae.")) is not None:
            if rest.startswith("per_channel_statistics."):
                back = {v: k for k, v in _STATS.items()}
                if rest in back:
                    out["audio_vae"][back[rest]] = key
            else:
                out["audio_vae"][rest] = key
        elif key.startswith("vocoder."):
            out["vocoder"][_vocoder_to_diffusers(key)] = key
    out["vae"] = _vae_official_to_diffusers(vae_keys)
    return out


def transformer_class():
    from diffusers import LTX2VideoTransformer3DModel

    return LTX2VideoTransformer3DModel


# Name segments (top level or inside a block) that only LTX-2 has: the audio stream, the audio-video cross-attention
# and its modulation, the prompt AdaLN, the keyframe embedding, the connectors. No LTXV module name starts so.
_DISTINCT_SEGMENT_STARTS = ("audio_", "av_", "video_to_audio", "video_a2v", "scale_shift_table_a2v", "prompt_")
_DISTINCT_SEGMENTS = frozenset(_CONNECTOR_SUBTREES) | {"keyframes_abs_pos_embedding"}


def is_ltx2_file(keys: Iterable[str]) -> bool:
    """Whether a safetensors file's tensor names are LTX-2's: an audio VAE, vocoder or text projection, or transformer
    names (official, ComfyUI-LoRA, diffusers or diffusers-LoRA) of modules only LTX-2 has. LTXV files have none."""
    for k in keys:
        if k.startswith(("audio_vae.", "vocoder.", TEXT_PROJECTION_PREFIX)):
            return True
        if any(seg.startswith(_DISTINCT_SEGMENT_STARTS) or seg in _DISTINCT_SEGMENTS for seg in k.split(".")):
            return True
    return False


is_family_file = is_ltx2_file  # what `models.keys_of_file` asks every family's keys module


# --------------------------------------------------------------------------------------------------
# The official `config` metadata: the transformer section (with the connector fields ltx-core reads from it)

# official field -> diffusers field, same meaning and value
_SAME_FIELDS = (
    "in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "cross_attention_dim", "num_layers",
    "norm_eps", "caption_channels", "audio_in_channels", "audio_out_channels", "audio_num_attention_heads",
    "audio_attention_head_dim", "audio_cross_attention_dim", "timestep_scale_multiplier", "rope_type",
    "use_prompt_adaln_single", "ff_bias", "audio_ff_bias", "use_keyframes_abs_pos_embedding",
)  # fmt: skip
# What ltx-core checks (`check_config_value`) or assumes for every LTX-2 transformer.
_FIXED_FIELDS = dict(
    dropout=0.0, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
    use_linear_projection=False, only_cross_attention=False, cross_attention_norm=True, double_self_attention=False,
    upcast_attention=False, standardization_norm="rms_norm", norm_elementwise_affine=False, qk_norm="rms_norm",
    positional_embedding_type="rope", use_audio_video_cross_attention=True, share_ff=False, av_cross_ada_norm=True,
    use_middle_indices_grid=True,
)  # fmt: skip
# ltx-core's own classes checked for these; a diffusers config that differs cannot be written as an official file.
_V2_PROJECTION_FIELDS = dict(
    caption_proj_before_connector=True, caption_projection_first_linear=False, caption_proj_input_norm=False,
    caption_projection_second_linear=False,
)  # fmt: skip


def official_transformer_section(transformer: dict, connectors: dict | None = None) -> dict:
    """The official `config["transformer"]` section (ltx-core field names) for diffusers configs of the transformer
    and (optionally) the connectors: what ltx-core's `LTXModelConfigurator` and connector configurators read."""
    t = transformer
    out = {"_class_name": "AVTransformer3DModel", **_FIXED_FIELDS}
    out |= {k: t[k] for k in _SAME_FIELDS if k in t}
    out["positional_embedding_theta"] = t.get("rope_theta", 10000.0)
    out["positional_embedding_max_pos"] = [t.get("pos_embed_max_pos", 20), t.get("base_height", 2048),
                                           t.get("base_width", 2048)]  # fmt: skip
    out["audio_positional_embedding_max_pos"] = [t.get("audio_pos_embed_max_pos", 20)]
    out["av_ca_timestep_scale_multiplier"] = t.get("cross_attn_timestep_scale_multiplier", 1000)
    out["frequencies_precision"] = "float64" if t.get("rope_double_precision", True) else "float32"
    out["apply_gated_attention"] = bool(t.get("gated_attn", False))
    out["cross_attention_adaln"] = bool(t.get("cross_attn_mod", False))
    if not t.get("use_prompt_embeddings", True):
        out |= _V2_PROJECTION_FIELDS
    if connectors:
        c = connectors
        out["connector_num_attention_heads"] = c["video_connector_num_attention_heads"]
        out["connector_attention_head_dim"] = c["video_connector_attention_head_dim"]
        out["connector_num_layers"] = c["video_connector_num_layers"]
        out["audio_connector_num_attention_heads"] = c["audio_connector_num_attention_heads"]
        out["audio_connector_attention_head_dim"] = c["audio_connector_attention_head_dim"]
        out["audio_connector_num_layers"] = c["audio_connector_num_layers"]
        out["connector_positional_embedding_max_pos"] = [c.get("connector_rope_base_seq_len", 4096)]
        out["connector_apply_gated_attention"] = bool(c.get("video_gated_attn", False))
    return out


def diffusers_transformer_config(section: dict) -> dict:
    """The diffusers `LTX2VideoTransformer3DModel` config of an official transformer section (inverse of
    `official_transformer_section`; fields ltx-core defaults are defaulted the same way)."""
    s = section
    out = {k: s[k] for k in _SAME_FIELDS if k in s}
    video_pos = s.get("positional_embedding_max_pos", [20, 2048, 2048])
    out |= dict(pos_embed_max_pos=video_pos[0], base_height=video_pos[1], base_width=video_pos[2])
    out["audio_pos_embed_max_pos"] = s.get("audio_positional_embedding_max_pos", [20])[0]
    out["rope_theta"] = s.get("positional_embedding_theta", 10000.0)
    out["cross_attn_timestep_scale_multiplier"] = s.get("av_ca_timestep_scale_multiplier", 1)
    out["rope_double_precision"] = s.get("frequencies_precision", False) == "float64"
    out["rope_type"] = s.get("rope_type", "split")
    gated, modulated = bool(s.get("apply_gated_attention", False)), bool(s.get("cross_attention_adaln", False))
    out |= dict(gated_attn=gated, audio_gated_attn=gated, cross_attn_mod=modulated, audio_cross_attn_mod=modulated)
    out["use_prompt_embeddings"] = not s.get("caption_proj_before_connector", False)
    out["perturbed_attn"] = gated  # no weights: the STG-capable processor, as diffusers ships 2.3/2.5
    return out


def diffusers_connectors_config(section: dict, projection_shape: tuple[int, ...], registers: int | None) -> dict:
    """The diffusers `LTX2TextConnectors` config of an official transformer section, completed from the weights
    ltx-core sizes from Gemma (`projection_shape`: the 2.0 aggregate projection's [out, in]; 2.3+ per-modality
    projections take the Gemma 3 width 3840) and the learnable register count (fixed at 128 in ltx-core)."""
    s = section
    per_modality = bool(s.get("caption_proj_before_connector", False))
    width = 3840 if per_modality else projection_shape[0]
    heads, head_dim = s.get("connector_num_attention_heads", 30), s.get("connector_attention_head_dim", 128)
    gated = bool(s.get("connector_apply_gated_attention", False))
    out = dict(
        caption_channels=width, text_proj_in_factor=projection_shape[1] // width,
        video_connector_num_attention_heads=heads, video_connector_attention_head_dim=head_dim,
        video_connector_num_layers=s.get("connector_num_layers", 2), video_connector_num_learnable_registers=registers,
        video_gated_attn=gated, audio_gated_attn=gated,
        audio_connector_num_attention_heads=s.get("audio_connector_num_attention_heads", heads),
        audio_connector_attention_head_dim=s.get("audio_connector_attention_head_dim", head_dim),
        audio_connector_num_layers=s.get("audio_connector_num_layers", s.get("connector_num_layers", 2)),
        audio_connector_num_learnable_registers=registers,
        connector_rope_base_seq_len=s.get("connector_positional_embedding_max_pos", [1])[0],
        rope_theta=s.get("positional_embedding_theta", 10000.0), rope_type=s.get("rope_type", "split"),
        rope_double_precision=s.get("frequencies_precision", False) == "float64",
        per_modality_projections=per_modality, proj_bias=per_modality,
    )  # fmt: skip
    if (
        per_modality
    ):  # the projections map straight to the transformer's widths (ltx-core's defaults: 32 x 128, 32 x 64)
        out["video_hidden_dim"] = s.get("num_attention_heads", 32) * s.get("attention_head_dim", 128)
        out["audio_hidden_dim"] = s.get("audio_num_attention_heads", 32) * s.get("audio_attention_head_dim", 64)
    return out


def lightricks_config(diffusers_config: dict, connectors_config: dict | None = None) -> str:
    """The official `config` metadata (JSON with a "transformer" section) of a transformer whose diffusers config is
    given, so ltx-core and ComfyUI size the model from the file."""
    return json.dumps(
        {"transformer": official_transformer_section(diffusers_config, connectors_config)}, sort_keys=True
    )


# Our own key: the exact diffusers config of every component in the file (`official_checkpoint` writes it), so a
# file of any size loads back; the official `config` above stays what ltx-core and ComfyUI read.
DIFFUSERS_CONFIGS_KEY = "ltxv_tuner.diffusers_configs"


def _config_of(model) -> dict:
    config = dict(model.config)
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


def official_checkpoint(models: dict) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of an official single file holding the given diffusers components
    ({"transformer": model, "connectors": model, "vae": ..., "audio_vae": ..., "vocoder": ...}, any subset)."""
    tensors, configs = {}, {}
    for component, model in models.items():
        state = model.state_dict()
        for name, key in to_official(component, state).items():
            tensors[key] = state[name].detach().contiguous()
        configs[component] = _config_of(model)
    metadata = {DIFFUSERS_CONFIGS_KEY: json.dumps(configs, sort_keys=True, default=list)}
    if "transformer" in configs:
        transformer = {k: v for k, v in configs["transformer"].items() if not k.startswith("_")}
        metadata[LIGHTRICKS_CONFIG_KEY] = lightricks_config(transformer, configs.get("connectors"))
    return tensors, metadata

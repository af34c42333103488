"""LTX-2 model sources: named versions, a single file in the official layout, a diffusers folder, a local Gemma,
family detection and cache identities - all on the tiny LTX-2, offline."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ltxv_tuner.config import ModelConfig
from ltxv_tuner.errors import UserError
from ltxv_tuner.models import keys_of_file, ltx2_keys, ltx2_load, ltx2_tiny, ltxv_keys, ltxv_tiny
from ltxv_tuner.models.sources import MODEL_CONFIGS, versions

COMPONENTS = ("transformer", "connectors", "vae", "audio_vae", "vocoder")
LTX2_VERSIONS = [name for name, entry in versions().items() if entry.get("family") == "ltx2"]


def _assert_same_weights(loaded, reference):
    got, ref = loaded.state_dict(), reference.state_dict()
    assert got.keys() == ref.keys()
    different = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


@pytest.fixture(scope="module")
def tiny_components():
    return {name: build() for name, build in ltx2_load._TINY_BUILDERS.items()}


def _write_official(path: Path, components: dict, own_configs: bool = True) -> Path:
    tensors, metadata = ltx2_keys.official_checkpoint(components)
    if not own_configs:  # only what an official file carries: the `config` JSON
        metadata = {ltx2_keys.LIGHTRICKS_CONFIG_KEY: metadata[ltx2_keys.LIGHTRICKS_CONFIG_KEY]}
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, tiny_components) -> Path:
    """The tiny LTX-2 written as ONE file in the official key layout, with its `config` metadata."""
    return _write_official(tmp_path_factory.mktemp("official") / "tiny-ltx2.safetensors", tiny_components)


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory) -> Path:
    """A plain transformers folder holding the tiny Gemma 3 and its tokenizer (what model.text_encoder names)."""
    folder = tmp_path_factory.mktemp("gemma") / "gemma-tiny"
    ltx2_tiny.build_text_encoder().save_pretrained(folder)
    ltx2_tiny.build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, tiny_components) -> Path:
    """The tiny LTX-2 in LTX2Pipeline's folder layout, each component written with save_pretrained."""
    folder = tmp_path_factory.mktemp("diffusers") / "tiny-ltx2-diffusers"
    for name, model in tiny_components.items():
        model.save_pretrained(folder / name)
    ltx2_tiny.build_text_encoder().save_pretrained(folder / "text_encoder")
    ltx2_tiny.build_tokenizer().save_pretrained(folder / "tokenizer")
    ltx2_tiny.build_scheduler().save_pretrained(folder / "scheduler")
    return folder


# ------------------------------------------------------------------------------------------------------
# Named versions


@pytest.mark.parametrize(
    "name, repo, filename, config_dir",
    [
        ("LTX2_19B_DEV", "Lightricks/LTX-2", "ltx-2-19b-dev.safetensors", "ltx2-19b"),
        ("LTX2_19B_DISTILLED", "Lightricks/LTX-2", "ltx-2-19b-distilled.safetensors", "ltx2-19b"),
        ("LTX23_22B_DEV", "Lightricks/LTX-2.3", "ltx-2.3-22b-dev.safetensors", "ltx2.3-22b"),
        ("LTX23_22B_DISTILLED", "Lightricks/LTX-2.3", "ltx-2.3-22b-distilled-1.1.safetensors", "ltx2.3-22b"),
        ("LTX25_22B_DEV", "Lightricks/LTX-2.5", "diffusion_models/ltx-2.5-22b-dev-transformer-bf16.safetensors",
         "ltx2.5-22b"),
        ("LTX25_22B_DISTILLED", "Lightricks/LTX-2.5",
         "diffusion_models/ltx-2.5-22b-distilled-transformer-bf16.safetensors", "ltx2.5-22b"),
    ],
)  # fmt: skip
def test_named_versions_resolve_to_their_files_and_shipped_configs(name, repo, filename, config_dir):
    src = ModelConfig(model_source=name.lower().replace("_", "-")).source
    assert (src.kind, src.version, src.family, src.repo, src.filename) == ("named", name, "ltx2", repo, filename)
    assert src.config_dir == MODEL_CONFIGS / config_dir
    for component in COMPONENTS:
        assert (src.config_dir / component / "config.json").is_file()
    assert ModelConfig(model_source="LTXV_13B_097_DEV").source.family == "ltxv"


def test_shipped_configs_are_the_released_architectures():
    """What tells the versions apart (diffusers' conversion script, LTX2_FACTS): 2.3 gated attention, prompt AdaLN
    and per-modality projections; 2.5 without the video feed-forward bias; 2.3+ vocoder with bandwidth extension."""
    t20, t23, t25 = (
        json.loads((MODEL_CONFIGS / d / "transformer" / "config.json").read_text()) for d in ltx2_load.CONFIG_DIRS
    )
    assert (t20["num_layers"], t20["num_attention_heads"] * t20["attention_head_dim"], t20["caption_channels"]) == (
        48, 4096, 3840)  # fmt: skip
    assert (t20["audio_num_attention_heads"] * t20["audio_attention_head_dim"], t20["rope_type"]) == (2048, "split")
    assert not t20["gated_attn"] and t20["use_prompt_embeddings"]
    assert t23["gated_attn"] and t23["cross_attn_mod"] and t23["perturbed_attn"] and not t23["use_prompt_embeddings"]
    assert t25["ff_bias"] is False and t25["gated_attn"]
    c23 = json.loads((MODEL_CONFIGS / "ltx2.3-22b" / "connectors" / "config.json").read_text())
    assert c23["per_modality_projections"] and (c23["video_hidden_dim"], c23["audio_hidden_dim"]) == (4096, 2048)
    vocoders = [json.loads((MODEL_CONFIGS / d / "vocoder" / "config.json").read_text()) for d in ltx2_load.CONFIG_DIRS]
    assert [v["_class_name"] for v in vocoders] == ["LTX2Vocoder", "LTX2VocoderWithBWE", "LTX2VocoderWithBWE"]
    vae = json.loads((MODEL_CONFIGS / "ltx2-19b" / "vae" / "config.json").read_text())
    assert (vae["spatial_compression_ratio"], vae["temporal_compression_ratio"], vae["latent_channels"]) == (32, 8, 128)


def test_parameter_counts_of_the_released_sizes():
    """19B is the 2.0 transformer; 2.3's "22B" counts its text connectors and aggregate projections too, which grew
    from 1.4e9 to 3.2e9 (the 2.3 transformer itself is 19.0e9)."""
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    counts = {}
    for name in ("LTX2_19B_DEV", "LTX23_22B_DEV", "LTX25_22B_DEV"):
        cfg = ModelConfig(model_source=name)
        connectors = ltx2_load._public(ltx2_load._shipped(cfg.source.config_dir, "connectors"))
        connectors.setdefault("caption_channels", ltx2_load.GEMMA3_WIDTH)  # 2.5: sized from its Gemma 4 at load
        with torch.device("meta"):
            extra = sum(p.numel() for p in LTX2TextConnectors(**connectors).parameters())
        counts[name] = (ltx2_load.count_params(ltx2_load.architecture(cfg)), extra)
    transformer_19b, connectors_19b = counts["LTX2_19B_DEV"]
    assert 18.5e9 < transformer_19b < 19.5e9 and 1.3e9 < connectors_19b < 1.5e9
    transformer_22b, connectors_22b = counts["LTX23_22B_DEV"]
    assert 18.5e9 < transformer_22b < 19.5e9 and 21.5e9 < transformer_22b + connectors_22b < 22.5e9
    assert 18.5e9 < counts["LTX25_22B_DEV"][0] < 19.5e9


@pytest.mark.parametrize("name", LTX2_VERSIONS)
def test_every_named_version_fails_offline_in_one_line(no_hub, name):
    entry = versions()[name]
    cfg = ModelConfig(model_source=name)
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        ltx2_load.load_transformer(cfg)
    msg = str(err.value)
    assert msg.startswith("model.model_source: ") and "\n" not in msg
    assert entry["repo"] in msg and entry["filename"] in msg and "point model.model_source at a local" in msg
    with pytest.raises(UserError) as err:
        ltx2_load.load_text_encoder(cfg)
    msg = str(err.value)
    assert msg.startswith("model.text_encoder: ") and "\n" not in msg and "set model.text_encoder to a local" in msg
    assert entry.get("text_encoder_repo", "Gemma 4") in msg
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------------------------------------------
# A single file in the official layout


def test_official_file_key_names_are_ltx_cores(official_file):
    """Names checked literally against ltx-core's module tree (LTXModel, Embeddings1DConnector, the feature
    extractor, VideoEncoder/Decoder, AudioEncoder, Vocoder) and diffusers' LTX-2 single-file key list."""
    with safe_open(str(official_file), "pt") as f:
        names, metadata = set(f.keys()), f.metadata()
    expected = {
        "model.diffusion_model.patchify_proj.weight",
        "model.diffusion_model.audio_patchify_proj.weight",
        "model.diffusion_model.adaln_single.emb.timestep_embedder.linear_1.weight",
        "model.diffusion_model.av_ca_a2v_gate_adaln_single.emb.timestep_embedder.linear_1.weight",
        "model.diffusion_model.caption_projection.linear_1.weight",
        "model.diffusion_model.transformer_blocks.0.attn1.q_norm.weight",
        "model.diffusion_model.transformer_blocks.0.scale_shift_table_a2v_ca_audio",
        "model.diffusion_model.transformer_blocks.1.video_to_audio_attn.to_k.weight",
        "model.diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.q_norm.weight",
        "model.diffusion_model.audio_embeddings_connector.learnable_registers",
        "text_embedding_projection.aggregate_embed.weight",
        "vae.per_channel_statistics.mean-of-means",
        "vae.encoder.down_blocks.1.conv.conv.weight",
        "vae.encoder.down_blocks.8.res_blocks.0.conv1.conv.weight",
        "vae.decoder.up_blocks.0.res_blocks.0.conv1.conv.weight",
        "audio_vae.per_channel_statistics.std-of-means",
        "audio_vae.encoder.conv_in.conv.weight",
        "vocoder.conv_pre.weight",
        "vocoder.ups.0.weight",
        "vocoder.resblocks.0.convs1.0.weight",
    }
    assert expected <= names
    diffusers_only = {
        "norm_q",
        "norm_k",
        "resnets",
        "proj_in",
        "time_embed",
        "downsamplers",
        "upsamplers",
        "latents_mean",
    }
    assert not [k for k in names if set(k.split(".")) & diffusers_only]
    section = json.loads(metadata["config"])["transformer"]
    assert section["num_layers"] == 2 and section["caption_channels"] == ltx2_tiny.GEMMA_HIDDEN
    assert section["connector_num_layers"] == 1 and section["frequencies_precision"] == "float64"


def test_diffusers_single_file_converters_agree_with_the_mapping(official_file, tiny_components):
    """An independent check: diffusers' own LTX-2 single-file converters (transformer, video VAE, audio VAE of 2.0)
    turn the official tiny file into exactly the diffusers state dicts our mapping reads."""
    from diffusers.loaders import single_file_utils as sfu

    with safe_open(str(official_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def part(prefix):
        return {k: v for k, v in tensors.items() if k.startswith(prefix)}

    converted = {
        "transformer": sfu.convert_ltx2_transformer_to_diffusers(part("model.diffusion_model.")),
        "vae": sfu.convert_ltx2_vae_to_diffusers(part("vae.")),
        "audio_vae": sfu.convert_ltx2_audio_vae_to_diffusers(part("audio_vae.")),
    }
    for name, state in converted.items():
        reference = tiny_components[name].state_dict()
        assert state.keys() == reference.keys(), name
        assert all(torch.equal(state[k], reference[k]) for k in reference), name


def test_official_file_loads_every_component_exactly(official_file, tiny_components):
    cfg = ModelConfig(model_source=str(official_file))
    assert (cfg.source.kind, cfg.source.family) == ("single_file", "ltx2")
    for name, reference in tiny_components.items():
        _assert_same_weights(ltx2_load.load_component(cfg, name), reference)
    expected = {k: v for k, v in dict(tiny_components["transformer"].config).items() if not k.startswith("_")}
    assert json.dumps(ltx2_load.architecture(cfg), sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert json.loads(ltx2_load.base_checkpoint_metadata(cfg)["config"])["transformer"]["num_layers"] == 2
    vae = ltx2_load.load_vae(cfg, dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}


def test_official_config_metadata_alone_sizes_transformer_and_connectors(tmp_path, tiny_components):
    """Without this tool's diffusers configs, the official `config` section (ltx-core's field names) is enough for the
    transformer and the connectors; the tiny VAE is no released architecture, so it fails in one clear line."""
    path = _write_official(tmp_path / "official-config-only.safetensors", tiny_components, own_configs=False)
    cfg = ModelConfig(model_source=str(path))
    _assert_same_weights(ltx2_load.load_transformer(cfg), tiny_components["transformer"])
    _assert_same_weights(ltx2_load.load_connectors(cfg), tiny_components["connectors"])
    with pytest.raises(UserError, match=r"^model.model_source: the LTX-2 video VAE in .* matches no known") as err:
        ltx2_load.load_vae(cfg)
    assert "\n" not in str(err.value)


def test_not_an_ltx2_file_is_a_clear_error(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.audio_attn1.to_q.lora_A.weight": torch.zeros(2, 4)}, str(lora))
    with pytest.raises(UserError, match="is a LoRA file, not a base model"):
        ltx2_load.load_transformer(ModelConfig(model_source=str(lora)))
    audio_only = tmp_path / "audio_only.safetensors"
    save_file({"audio_vae.encoder.conv_in.conv.weight": torch.zeros(2, 2, 3, 3)}, str(audio_only))
    with pytest.raises(UserError, match="holds no LTX-2 transformer weights"):
        ltx2_load.load_transformer(ModelConfig(model_source=str(audio_only)))


# ------------------------------------------------------------------------------------------------------
# A diffusers folder and a local Gemma


def test_diffusers_folder_loads_every_component_exactly(diffusers_folder, tiny_components):
    cfg = ModelConfig(model_source=str(diffusers_folder))
    assert (cfg.source.kind, cfg.source.family) == ("diffusers", "ltx2")
    for name, reference in tiny_components.items():
        _assert_same_weights(ltx2_load.load_component(cfg, name), reference)
    tokenizer, encoder = ltx2_load.load_text_encoder(cfg)
    _assert_same_weights(encoder, ltx2_tiny.build_text_encoder())
    prompt = ["a red ball bouncing on a wooden floor"]
    reference_tokenizer = ltx2_tiny.build_tokenizer()
    ids = tokenizer(prompt, padding="max_length", max_length=16).input_ids
    assert ids == reference_tokenizer(prompt, padding="max_length", max_length=16).input_ids
    assert tokenizer.padding_side == "left"
    assert ltx2_load.load_scheduler(cfg).config.shift_terminal == ltx2_tiny.build_scheduler().config.shift_terminal


def test_local_gemma_folder_as_model_text_encoder(official_file, gemma_folder, diffusers_folder):
    for folder in (gemma_folder, diffusers_folder):  # a transformers folder, or text_encoder/ + tokenizer/
        cfg = ModelConfig(model_source=str(official_file), text_encoder=str(folder))
        tokenizer, encoder = ltx2_load.load_text_encoder(cfg)
        _assert_same_weights(encoder, ltx2_tiny.build_text_encoder())
        assert tokenizer("a red ball").input_ids == ltx2_tiny.build_tokenizer()("a red ball").input_ids
    cfg = ModelConfig(model_source="LTX2_19B_DEV", text_encoder=str(gemma_folder))
    _assert_same_weights(ltx2_load.load_text_encoder(cfg)[1], ltx2_tiny.build_text_encoder())
    with pytest.raises(UserError, match="is not a Gemma folder"):
        ltx2_load.load_text_encoder(ModelConfig(model_source="tiny-ltx2", text_encoder=str(gemma_folder.parent)))


# ------------------------------------------------------------------------------------------------------
# Family detection


def test_family_of_local_files_and_folders(tmp_path, official_file, diffusers_folder):
    assert ModelConfig(model_source=str(official_file)).source.family == "ltx2"
    assert ModelConfig(model_source=str(diffusers_folder)).source.family == "ltx2"
    audio_only = tmp_path / "audio.safetensors"  # an LTX-2 component file: audio VAE only
    save_file({"audio_vae.decoder.conv_out.conv.weight": torch.zeros(1)}, str(audio_only))
    assert ModelConfig(model_source=str(audio_only)).source.family == "ltx2"
    ltxv = tmp_path / "ltxv.safetensors"
    tensors = {
        ltxv_keys.ORIGINAL_TRANSFORMER_PREFIX + ltxv_keys.diffusers_to_original(k): v.contiguous()
        for k, v in ltxv_tiny.build_tiny_transformer().state_dict().items()
    }
    save_file(tensors, str(ltxv))
    assert ModelConfig(model_source=str(ltxv)).source.family == "ltxv"
    ltxv_folder = tmp_path / "ltxv_folder"
    ltxv_tiny.build_tiny_transformer().save_pretrained(ltxv_folder / "transformer")
    assert ModelConfig(model_source=str(ltxv_folder)).source.family == "ltxv"
    assert keys_of_file(["transformer.transformer_blocks.0.audio_attn1.to_q.lora_A.weight"]) is ltx2_keys
    assert keys_of_file(["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"]) is ltxv_keys
    assert keys_of_file(["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"], {"ltxv_tuner.family": "ltx2"})
    assert ltx2_keys.is_ltx2_file(["model.diffusion_model.audio_adaln_single.linear.weight"])


# ------------------------------------------------------------------------------------------------------
# Identities


def test_identities_follow_the_weights(tmp_path, tiny_components, diffusers_folder, gemma_folder):
    path = _write_official(tmp_path / "model.safetensors", tiny_components)
    cfg = ModelConfig(model_source=str(path))
    first = ltx2_load.model_identity(cfg)
    assert set(first) == {"transformer", "vae", "audio_vae", "text_encoder"}
    assert len(set(first.values())) == 4
    assert ltx2_load.model_identity(cfg) == first  # cheap and stable
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file was rewritten
    assert ltx2_load.model_identity(ModelConfig(model_source=str(path)))["transformer"] != first["transformer"]
    with_gemma = ltx2_load.model_identity(ModelConfig(model_source=str(path), text_encoder=str(gemma_folder)))
    assert (
        with_gemma["text_encoder"].startswith(f"dir:{gemma_folder}")
        and with_gemma["text_encoder"] != first["text_encoder"]
    )
    named = ltx2_load.model_identity(ModelConfig(model_source="LTX23_22B_DEV"))
    assert named["transformer"].startswith("hf:Lightricks/LTX-2.3/ltx-2.3-22b-dev.safetensors@")
    assert "google/gemma-3-12b-it-qat-q4_0-unquantized" in named["text_encoder"]
    folder = ltx2_load.model_identity(ModelConfig(model_source=str(diffusers_folder)))
    assert folder["vae"].startswith(f"dir:{diffusers_folder / 'vae'}") and folder["vae"] != folder["audio_vae"]
    assert folder["text_encoder"].startswith(f"dir:{diffusers_folder}|")  # its text_encoder/ + tokenizer/

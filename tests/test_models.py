"""Model sources: local single files in Lightricks' layout, diffusers folders, named versions via the HF cache."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ltxv_tuner.config import ModelConfig
from ltxv_tuner.errors import UserError
from ltxv_tuner.models import ltxv as models
from ltxv_tuner.models import ltxv_tiny as tiny
from ltxv_tuner.models.ltxv_keys import ORIGINAL_TRANSFORMER_PREFIX, diffusers_to_original

# A VAE that diffusers reads in the 0.9.5 key layout (encoder conv_out input width 2048), kept small.
SMALL_VAE_095 = dict(tiny.VAE_095_KWARGS, block_out_channels=(8, 16, 32, 256, 2048), layers_per_block=(1, 1, 1, 1, 0))


def _vae_095_to_original(name: str) -> str:
    """diffusers VAE name -> Lightricks' original name (0.9.5 layout), without the `vae.` prefix."""
    rules = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down_blocks.{2 * int(m[1])}.res_blocks."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down_blocks.{2 * int(m[1]) + 1}."),
        (r"^encoder\.mid_block\.resnets\.", lambda m: "encoder.down_blocks.8.res_blocks."),
        (r"^decoder\.mid_block\.resnets\.", lambda m: "decoder.up_blocks.0.res_blocks."),
        (r"^decoder\.mid_block\.", lambda m: "decoder.up_blocks.0."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up_blocks.{2 * int(m[1]) + 1}."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up_blocks.{2 * int(m[1]) + 2}.res_blocks."),
        (r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up_blocks.{2 * int(m[1]) + 2}."),
        (r"^decoder\.time_embedder\.", lambda m: "decoder.last_time_embedder."),
        (r"^decoder\.scale_shift_table$", lambda m: "decoder.last_scale_shift_table"),
        (r"^latents_mean$", lambda m: "per_channel_statistics.mean-of-means"),
        (r"^latents_std$", lambda m: "per_channel_statistics.std-of-means"),
    ]
    for pattern, repl in rules:
        name, n = re.subn(pattern, repl, name)
        if n:
            break
    return name.replace(".conv_shortcut.conv.", ".conv_shortcut.").replace(".norm3.", ".norm3.norm.")


def _small_vae():
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(**SMALL_VAE_095).eval()
    with torch.no_grad():  # non-trivial statistics, so a mix-up of mean/std would show
        vae.latents_mean.copy_(torch.linspace(-1, 1, 128))
        vae.latents_std.copy_(torch.linspace(0.5, 2, 128))
    return vae


def _metadata(vae=None, transformer_cfg=None) -> dict[str, str]:
    cfg = {}
    if transformer_cfg is not None:  # Lightricks-style transformer section (same field names as diffusers)
        cfg["transformer"] = {"_class_name": "Transformer3DModel", "qk_norm": "rms_norm", **transformer_cfg}
    if vae is not None:  # a diffusers VAE config, which the loader uses when no shipped config fits
        cfg["vae"] = {"_class_name": "AutoencoderKLLTXVideo", **{k: v for k, v in vae.config.items() if k[0] != "_"}}
    return {"config": json.dumps(cfg)}


def _write_single_file(path: Path, transformer, vae, metadata=None) -> Path:
    tensors = {}
    for k, v in transformer.state_dict().items():
        tensors[ORIGINAL_TRANSFORMER_PREFIX + diffusers_to_original(k)] = v.contiguous()
    if vae is not None:
        for k, v in vae.state_dict().items():
            tensors["vae." + _vae_095_to_original(k)] = v.contiguous()
    save_file(tensors, str(path), metadata=metadata)
    return path


def _assert_same_weights(loaded, reference):
    ref = reference.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


@pytest.fixture(scope="module")
def reference_models():
    return tiny.build_tiny_transformer().eval(), _small_vae()


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, reference_models) -> Path:
    transformer, vae = reference_models
    path = tmp_path_factory.mktemp("ckpt") / "my-ltxv.safetensors"
    return _write_single_file(path, transformer, vae, _metadata(vae, tiny.TINY_TRANSFORMER_CONFIG))


# ------------------------------------------------------------------------------------------------------
# Local single file


def test_test_vae_file_uses_the_095_original_layout(single_file):
    from diffusers.loaders.single_file_utils import convert_ltx_vae_checkpoint_to_diffusers
    from safetensors import safe_open

    # Our renaming must be exactly what diffusers undoes, or the round trip below tests nothing real.
    with safe_open(str(single_file), "pt") as f:
        vae_keys = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys() if k.startswith("vae.")}
    converted = set(convert_ltx_vae_checkpoint_to_diffusers(dict(vae_keys)))
    assert converted == set(_small_vae().state_dict())
    assert any(".res_blocks." in k for k in vae_keys) and "vae.decoder.last_scale_shift_table" in vae_keys


def test_single_file_loads_exact_weights(single_file, reference_models):
    transformer, vae = reference_models
    cfg = ModelConfig(model_source=str(single_file))
    loaded_t = models.load_transformer(cfg)
    loaded_v = models.load_vae(cfg)
    _assert_same_weights(loaded_t, transformer)
    _assert_same_weights(loaded_v, vae)
    assert loaded_t.config.num_layers == 2 and loaded_v.config.block_out_channels[-1] == 2048
    # The loaded VAE behaves like the saved one.
    x = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded_v.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)


def test_single_file_loads_in_requested_dtype(single_file):
    cfg = ModelConfig(model_source=str(single_file))
    transformer = models.load_transformer(cfg, dtype=torch.bfloat16)
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in transformer.parameters())


def test_base_checkpoint_metadata(single_file):
    meta = models.base_checkpoint_metadata(ModelConfig(model_source=str(single_file)))
    assert json.loads(meta["config"])["transformer"]["num_layers"] == 2
    assert models.base_checkpoint_metadata(ModelConfig(model_source="tiny")) is None


def test_transformer_only_file_in_diffusers_names(tmp_path, reference_models):
    transformer, _ = reference_models
    path = tmp_path / "ltxv_transformer_step_000010.safetensors"  # what a full fine-tune of this tool exports
    save_file(dict(transformer.state_dict()), str(path), metadata=_metadata(None, tiny.TINY_TRANSFORMER_CONFIG))
    _assert_same_weights(models.load_transformer(ModelConfig(model_source=str(path))), transformer)


def test_file_of_unknown_architecture_is_a_clear_error(tmp_path, reference_models):
    transformer, vae = reference_models
    path = _write_single_file(tmp_path / "nometa.safetensors", transformer, vae)  # no metadata: 2 blocks of 32
    cfg = ModelConfig(model_source=str(path))
    with pytest.raises(UserError, match=r"2 transformer blocks of width 32.*matches no known LTXV"):
        models.load_transformer(cfg)
    with pytest.raises(UserError, match=r"matches no known LTXV VAE"):
        models.load_vae(cfg)


def test_non_ltxv_files_are_rejected(tmp_path):
    sd = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(sd))
    with pytest.raises(UserError, match="holds no LTXV transformer weights"):
        models.load_transformer(ModelConfig(model_source=str(sd)))
    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(UserError, match="is a LoRA file"):
        models.load_transformer(ModelConfig(model_source=str(lora)))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable .safetensors"):
        models.load_transformer(ModelConfig(model_source=str(junk)))


def test_transformer_only_file_needs_model_vae(tmp_path, reference_models):
    transformer, vae = reference_models
    path = _write_single_file(
        tmp_path / "t.safetensors", transformer, None, _metadata(None, tiny.TINY_TRANSFORMER_CONFIG)
    )
    with pytest.raises(UserError, match="holds only a transformer, no VAE; set model.vae"):
        models.load_vae(ModelConfig(model_source=str(path)))
    vae_file = tmp_path / "vae.safetensors"
    _write_single_file(vae_file, transformer, vae, _metadata(vae))
    _assert_same_weights(models.load_vae(ModelConfig(model_source=str(path), vae=str(vae_file))), vae)


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_file_loads_in_requested_dtype(tmp_path, reference_models, scaled):
    transformer, _ = reference_models
    fp8 = torch.float8_e4m3fn
    tensors, expected = {}, {}
    for k, v in transformer.state_dict().items():
        name = ORIGINAL_TRANSFORMER_PREFIX + diffusers_to_original(k)
        if v.ndim == 2 and k.endswith(
            ".weight"
        ):  # Linear weights stored in fp8, as in Lightricks' / ComfyUI's fp8 files
            scale = v.abs().max() / 448 if scaled else torch.tensor(1.0)
            q = (v / scale).to(fp8)
            tensors[name] = q
            if scaled:
                tensors[name.removesuffix(".weight") + ".weight_scale"] = scale.reshape(())
                tensors[name.removesuffix(".weight") + ".input_scale"] = torch.tensor(1.0)
            expected[k] = (q.float() * scale).to(torch.bfloat16)
        else:
            tensors[name] = v.to(torch.bfloat16)
            expected[k] = v.to(torch.bfloat16)
    path = tmp_path / "fp8.safetensors"
    save_file(tensors, str(path), metadata=_metadata(None, tiny.TINY_TRANSFORMER_CONFIG))
    loaded = models.load_transformer(ModelConfig(model_source=str(path)), dtype=torch.bfloat16).state_dict()
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        assert loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], v), k
    if scaled:  # the dequantised weights are close to the originals, not 448x off
        w = "transformer_blocks.0.attn1.to_q.weight"
        assert torch.allclose(loaded[w].float(), transformer.state_dict()[w], rtol=0.15, atol=1e-3)


def test_missing_and_unknown_sources(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        models.load_transformer(ModelConfig(model_source=str(missing)))
    with pytest.raises(UserError, match="did you mean LTXV_13B_097_DEV"):
        _ = ModelConfig(model_source="LTXV_13B_097_DEVV").source
    with pytest.raises(UserError, match="model.vae: .*does not exist"):
        models.load_vae(ModelConfig(model_source="tiny", vae=str(tmp_path / "vae.safetensors")))
    with pytest.raises(UserError, match="model.text_encoder: .*does not exist"):
        models.load_text_encoder(ModelConfig(model_source="tiny", text_encoder=str(tmp_path / "t5")))


# ------------------------------------------------------------------------------------------------------
# Diffusers folder


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipe")
    tiny.build_tiny_transformer().save_pretrained(root / "transformer")
    tiny.build_tiny_vae().save_pretrained(root / "vae")
    tiny.build_tiny_text_encoder().save_pretrained(root / "text_encoder")
    tiny.build_tiny_tokenizer().save_pretrained(root / "tokenizer")
    models.build_scheduler().save_pretrained(root / "scheduler")
    return root


def test_diffusers_folder_round_trip(diffusers_folder):
    cfg = ModelConfig(model_source=str(diffusers_folder))
    assert cfg.source.kind == "diffusers"
    _assert_same_weights(models.load_transformer(cfg), tiny.build_tiny_transformer())
    _assert_same_weights(models.load_vae(cfg), tiny.build_tiny_vae())
    tokenizer, encoder = models.load_text_encoder(cfg, dtype=torch.bfloat16)
    _assert_same_weights(encoder, tiny.build_tiny_text_encoder().to(torch.bfloat16))
    assert encoder.dtype == torch.bfloat16
    text = "a red ball bouncing"
    assert tokenizer(text).input_ids == tiny.build_tiny_tokenizer()(text).input_ids
    assert models.load_scheduler(cfg).config.shift_terminal == pytest.approx(0.1)
    assert models.base_checkpoint_metadata(cfg) is None


def test_text_encoder_and_vae_overrides(diffusers_folder, single_file, reference_models):
    _, vae = reference_models
    cfg = ModelConfig(model_source="tiny", text_encoder=str(diffusers_folder), vae=str(single_file))
    _assert_same_weights(models.load_vae(cfg), vae)
    _, encoder = models.load_text_encoder(cfg)
    _assert_same_weights(encoder, tiny.build_tiny_text_encoder())
    # a plain T5 folder (config.json + weights + tokenizer files together) works too
    plain = diffusers_folder.parent / "plain_t5"
    tiny.build_tiny_text_encoder().save_pretrained(plain)
    tiny.build_tiny_tokenizer().save_pretrained(plain)
    _, encoder = models.load_text_encoder(ModelConfig(model_source="tiny", text_encoder=str(plain)))
    _assert_same_weights(encoder, tiny.build_tiny_text_encoder())


# ------------------------------------------------------------------------------------------------------
# Named versions


def test_named_versions_resolve_case_insensitively():
    src = ModelConfig(model_source="ltxv_2b_0.9.6_dev").source
    assert (src.kind, src.version, src.repo) == ("named", "LTXV_2B_0.9.6_DEV", "Lightricks/LTX-Video")
    assert src.filename == "ltxv-2b-0.9.6-dev-04-25.safetensors"
    cfg13 = models.transformer_config("LTXV_13B_097_DEV")
    assert (cfg13["num_layers"], cfg13["num_attention_heads"], cfg13["attention_head_dim"]) == (48, 32, 128)
    assert cfg13["cross_attention_dim"] == cfg13["caption_channels"] == 4096
    cfg2 = models.transformer_config("LTXV_2B_0.9.0")
    assert (cfg2["num_layers"], cfg2["attention_head_dim"], cfg2["cross_attention_dim"]) == (28, 64, 2048)


@pytest.mark.parametrize(
    "name, filename, same_as",
    [
        ("LTXV_13B_098_DEV", "ltxv-13b-0.9.8-dev.safetensors", "LTXV_13B_097_DEV"),
        ("LTXV_13B_098_DISTILLED", "ltxv-13b-0.9.8-distilled.safetensors", "LTXV_13B_097_DEV"),
        ("LTXV_2B_098_DISTILLED", "ltxv-2b-0.9.8-distilled.safetensors", "LTXV_2B_0.9.6_DEV"),
    ],
)
def test_ltxv_098_versions_are_named_with_the_097_architecture(name, filename, same_as):
    """0.9.8 is the 0.9.7 architecture (13B) and the 0.9.6 one (2B) in new files: the shipped configs are reused."""
    src = ModelConfig(model_source=name.lower()).source
    assert (src.kind, src.version, src.repo, src.filename) == ("named", name, "Lightricks/LTX-Video", filename)
    assert src.config_dir == ModelConfig(model_source=same_as).source.config_dir
    assert models.transformer_config(name) == models.transformer_config(same_as)
    assert models.inference_kind(ModelConfig(model_source=name)) == ("dev" if name.endswith("DEV") else "distilled")


def test_named_version_offline_and_not_cached_fails_fast(no_hub):
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        models.load_transformer(ModelConfig(model_source="LTXV_13B_097_DEV"))
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "Lightricks/LTX-Video" in msg and "ltxv-13b-0.9.7-dev.safetensors" in msg and "\n" not in msg
    assert "model.model_source" in msg
    with pytest.raises(UserError, match="text encoder"):
        models.load_text_encoder(ModelConfig(model_source="LTXV_13B_097_DEV"))


def test_named_version_without_network_fails_fast(monkeypatch, tmp_path):
    # Not offline mode, but the hub is unreachable (a closed local port): one probe, no retry loop.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(UserError, match=r"ltx-video-2b-v0.9.1.safetensors .*Lightricks/LTX-Video \(no connection"):
        models.load_vae(ModelConfig(model_source="LTXV_2B_0.9.1"))
    with pytest.raises(UserError, match=r"^model.text_encoder: .*no connection.*set model.text_encoder"):
        models.load_text_encoder(ModelConfig(model_source="LTXV_2B_0.9.1"))
    assert time.monotonic() - start < 5


def _populate_hub_cache(cache: Path, repo: str, files: dict[str, Path], rev: str = "0123456789abcdef" * 2 + "01234567"):
    """Lay out files like huggingface_hub does: models--<org>--<name>/snapshots/<rev>/<file> + refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    for name, src in files.items():
        dst = root / "snapshots" / rev / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(rev)


def test_named_version_found_in_hf_cache_offline(no_hub, single_file, reference_models, diffusers_folder):
    transformer, vae = reference_models
    files = {"ltx-video-2b-v0.9.5.safetensors": single_file}
    for sub in ("text_encoder", "tokenizer"):
        files |= {f"{sub}/{p.name}": p for p in (diffusers_folder / sub).iterdir()}
    _populate_hub_cache(no_hub / "hub", "Lightricks/LTX-Video", files)
    cfg = ModelConfig(model_source="LTXV_2B_0.9.5")
    _assert_same_weights(models.load_transformer(cfg), transformer)
    _assert_same_weights(models.load_vae(cfg), vae)
    _, encoder = models.load_text_encoder(cfg)
    _assert_same_weights(encoder, tiny.build_tiny_text_encoder())
    assert json.loads(models.base_checkpoint_metadata(cfg)["config"])["transformer"]["num_layers"] == 2


# ------------------------------------------------------------------------------------------------------
# Identities


def test_identities_differ_per_source(single_file, diffusers_folder, tmp_path):
    def ident(**kw):
        return models.model_identity(ModelConfig(**kw))

    base = ident(model_source=str(single_file))
    others = [
        ident(model_source="tiny"),
        ident(model_source="LTXV_13B_097_DEV"),
        ident(model_source="LTXV_13B_097_DISTILLED"),
        ident(model_source=str(diffusers_folder)),
    ]
    for other in others:
        assert other["transformer"] != base["transformer"]
    assert ident(model_source="LTXV_13B_097_DEV") == ident(model_source="ltxv_13b_097_dev")
    with_vae = ident(model_source=str(single_file), vae=str(diffusers_folder / "vae"))
    assert with_vae["vae"] != base["vae"] and with_vae["transformer"] == base["transformer"]
    with_te = ident(model_source=str(single_file), text_encoder=str(diffusers_folder))
    assert with_te["text_encoder"] != base["text_encoder"] and with_te["vae"] == base["vae"]
    # a changed file is a different model
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(single_file.read_bytes())
    first = ident(model_source=str(copy))
    with open(copy, "ab") as f:
        f.write(b" ")
    assert ident(model_source=str(copy))["transformer"] != first["transformer"]


def test_tiny_tokenizer_gives_the_same_token_ids_in_every_process():
    """The trainer behind the tiny tokenizer orders equal-score pieces differently per process; cached captions
    (one process) and validation prompts (another) must still tokenize alike."""
    import subprocess
    import sys

    code = (
        "from ltxv_tuner.models.ltxv_tiny import build_tiny_tokenizer; "
        "print(sorted(build_tiny_tokenizer().get_vocab().items()))"
    )
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(4)}  # fmt: skip
    assert len(outs) == 1

"""LTX-2 exports: the diffusers-format LoRA, its ComfyUI twin in the official trainer's format (official module names,
alpha folded into lora_B, no `.alpha`), the full fine-tune's twin in the official single-file layout - checked by
loading them back through diffusers' LTX2Pipeline and through our own single-file loader. Train-free, tiny, CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from ltxv_tuner import convert, export
from ltxv_tuner.config import ModelConfig, validate_config
from ltxv_tuner.models import ltx2_keys, ltx2_load, ltx2_tiny

RANK, ALPHA = 4, 12  # alpha != rank: a twin that ignored alpha would be off by 3x


def make_cfg(mode="lora", targets=("to_k", "to_q", "to_v", "to_out.0"), dtype="fp32"):
    return validate_config(
        {
            "dataset": {"data_folder": "data", "resolution_buckets": [[64, 64, 9]]},
            "model": {"model_source": "tiny-ltx2", "training_mode": mode},
            "lora": {"rank": RANK, "alpha": ALPHA, "target_modules": list(targets)},
            "training": {"steps": 10},
            "checkpoints": {"save_dtype": dtype},
        }
    )


def trained_lora(cfg, seed=0):
    transformer = ltx2_tiny.build_transformer()
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(cfg.lora.target_modules)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a "trained" LoRA must change the output
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return transformer


def forward_inputs():
    """Fixed video + audio tokens, text features for both streams, a timestep (already x1000)."""
    g = torch.Generator().manual_seed(1)
    frames, height, width, audio_frames = 2, 2, 2, 5
    return dict(
        hidden_states=torch.randn(1, frames * height * width, 128, generator=g),
        audio_hidden_states=torch.randn(1, audio_frames, 128, generator=g),
        encoder_hidden_states=torch.randn(1, 6, ltx2_tiny.GEMMA_HIDDEN, generator=g),
        audio_encoder_hidden_states=torch.randn(1, 6, ltx2_tiny.GEMMA_HIDDEN, generator=g),
        timestep=torch.full((1,), 500.0),
        encoder_attention_mask=torch.ones(1, 6),
        audio_encoder_attention_mask=torch.ones(1, 6),
        num_frames=frames,
        height=height,
        width=width,
        fps=25.0,
        audio_num_frames=audio_frames,
        return_dict=False,
    )


def pipeline_output(lora_file) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer of a tiny LTX2Pipeline (no text encoder) after `load_lora_weights(lora_file)`."""
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline(
        scheduler=ltx2_tiny.build_scheduler(), vae=ltx2_tiny.build_video_vae(), audio_vae=ltx2_tiny.build_audio_vae(),
        text_encoder=None, tokenizer=None, connectors=ltx2_tiny.build_connectors(),
        transformer=ltx2_tiny.build_transformer(), vocoder=ltx2_tiny.build_vocoder(),
    )  # fmt: skip
    pipe.load_lora_weights(str(lora_file))
    with torch.no_grad():
        return pipe.transformer(**forward_inputs())


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize(
    "targets", [("to_k", "to_q", "to_v", "to_out.0"), ("to_q", "to_v", "proj_in", "audio_proj_in", "ff.net.2")]
)
def test_lora_twin_loads_in_ltx2_pipeline_like_the_trained_adapter(tmp_path, targets):
    cfg = make_cfg(targets=targets)
    transformer = trained_lora(cfg)
    with torch.no_grad():
        expected = transformer(**forward_inputs())
        base = ltx2_tiny.build_transformer()(**forward_inputs())
    lora = export.save_lora(tmp_path, transformer, cfg, 250)
    twin = convert.convert_file(lora)

    tensors, meta = read(twin)
    assert tensors and all(k.startswith("diffusion_model.") for k in tensors)
    assert not any(k.endswith(".alpha") for k in tensors)
    assert export.LORA_ADAPTER_METADATA_KEY not in meta  # diffusers would scale by alpha/rank a second time
    assert meta["ltxv_tuner.family"] == "ltx2" and meta["modelspec.architecture"] == "ltx-2/lora"
    assert "diffusion_model.transformer_blocks.0.audio_attn1.to_q.lora_A.weight" in tensors
    if "proj_in" in targets:  # official module names (ltx-core's), never diffusers' top-level names
        assert "diffusion_model.patchify_proj.lora_B.weight" in tensors
        assert "diffusion_model.audio_patchify_proj.lora_A.weight" in tensors
        assert not any(".proj_in." in k for k in tensors)

    for path in (lora, twin):  # the diffusers-format file and the official-format twin
        got = pipeline_output(path)
        for g, e, b in zip(got, expected, base, strict=True):
            assert (g - b).abs().max() > 1e-2  # the LoRA really acts
            torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


def test_lora_twin_folds_alpha_exactly_into_lora_b(tmp_path):
    cfg = make_cfg()
    lora = export.save_lora(tmp_path, trained_lora(cfg), cfg, 5)
    source, _ = read(lora)
    twin, _ = read(convert.convert_file(lora))
    a = "transformer.transformer_blocks.1.video_to_audio_attn.to_v.lora_A.weight"
    b = a.replace("lora_A", "lora_B")
    official = "diffusion_model.transformer_blocks.1.video_to_audio_attn.to_v.lora_{}.weight"
    assert torch.equal(twin[official.format("A")], source[a])
    assert torch.equal(twin[official.format("B")], source[b] * (ALPHA / RANK))


def test_twin_converts_back_to_a_diffusers_lora_with_the_same_effect(tmp_path):
    cfg = make_cfg()
    transformer = trained_lora(cfg)
    with torch.no_grad():
        expected = transformer(**forward_inputs())
    twin = convert.convert_file(export.save_lora(tmp_path, transformer, cfg, 5))
    back = convert.convert_file(twin, to="diffusers")
    tensors, meta = read(back)
    assert all(k.startswith("transformer.transformer_blocks.") for k in tensors)
    assert json.loads(meta[export.LORA_ADAPTER_METADATA_KEY])["transformer.lora_alpha"] == RANK  # alpha is in B
    for g, e in zip(pipeline_output(back), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


def test_full_twin_is_the_official_layout_and_loads_back_exactly(tmp_path):
    cfg = make_cfg(mode="full")
    transformer = ltx2_tiny.build_transformer()
    with torch.no_grad():
        for p in transformer.parameters():  # "fine-tuned": differs from the tiny base
            p.add_(0.01)
    saved = export.save_full(tmp_path, transformer, cfg, 7)
    twin = convert.convert_file(saved)
    tensors, meta = read(twin)
    assert all(k.startswith("model.diffusion_model.") for k in tensors)
    assert "model.diffusion_model.audio_adaln_single.linear.weight" in tensors
    assert "model.diffusion_model.transformer_blocks.0.attn2.k_norm.weight" in tensors
    section = json.loads(meta[ltx2_keys.LIGHTRICKS_CONFIG_KEY])["transformer"]
    assert section["num_layers"] == 2 and section["audio_attention_head_dim"] == 8
    assert meta["modelspec.implementation"] == ltx2_keys.IMPLEMENTATION_ORIGINAL

    source = ModelConfig(model_source=str(twin)).source
    assert (source.kind, source.family) == ("single_file", "ltx2")
    loaded = ltx2_load.load_transformer(ModelConfig(model_source=str(twin)))
    reference = transformer.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(loaded.state_dict()[k], reference[k]) for k in reference)

    back = convert.convert_file(twin, to="diffusers")  # and the other way: diffusers names again
    tensors_back, _ = read(back)
    assert tensors_back.keys() == reference.keys()


def test_official_base_file_converts_to_its_diffusers_transformer(tmp_path):
    """A whole official checkpoint (transformer, connectors, VAEs, vocoder): --to-diffusers keeps the transformer
    (the connectors under model.diffusion_model. belong to diffusers' LTX2TextConnectors, not to it)."""
    from safetensors.torch import save_file

    components = {name: build() for name, build in ltx2_load._TINY_BUILDERS.items()}
    tensors, metadata = ltx2_keys.official_checkpoint(components)
    path = tmp_path / "ltx-2-tiny.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    out, _ = read(convert.convert_file(path, to="diffusers"))
    reference = components["transformer"].state_dict()
    assert out.keys() == reference.keys()
    assert all(torch.equal(out[k], reference[k]) for k in reference)


def test_convert_cli_on_an_ltx2_lora(tmp_path):
    cfg = make_cfg(dtype="bf16")
    lora = export.save_lora(tmp_path, trained_lora(cfg), cfg, 3)
    result = subprocess.run(
        [sys.executable, "-m", "ltxv_tuner.convert", str(lora)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    twin = convert.default_output(lora, "comfy")
    assert result.stdout.strip().endswith(str(twin))
    tensors, _ = read(twin)
    assert tensors and all(k.startswith("diffusion_model.") and not k.endswith(".alpha") for k in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}

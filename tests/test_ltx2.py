"""LTX-2 on the tiny-ltx2 model: text features cached before the connectors, the official noise-level sampler,
joint audio-video training from clips with and without sound, exact resume, two processes, the quickstart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_training import make_config, trainable_from_checkpoint

from ltxv_tuner import launch, training
from ltxv_tuner.cache import Manifest
from ltxv_tuner.models import ltx2, ltx2_tiny
from ltxv_tuner.preprocess import run_preprocess

EXAMPLES = REPO / "examples" / "quickstart_ltx2_data"
BUCKET = (128, 96, 33)


# --------------------------------------------------------------------------------------------------
# Pure pieces


@pytest.mark.parametrize("per_modality", [False, True], ids=["ltx2.0", "ltx2.3-projections"])
def test_cached_features_then_connectors_equal_the_pipelines_connectors(per_modality):
    """What training computes (projection cached at preprocessing, connectors each step) is exactly what
    LTX2TextConnectors.forward gives the pipeline from Gemma's hidden states."""
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    cfg = dict(ltx2_tiny.CONNECTORS_CONFIG)
    if per_modality:
        cfg |= {"per_modality_projections": True, "video_hidden_dim": 32, "audio_hidden_dim": 24}
        cfg["audio_connector_attention_head_dim"] = 12
    torch.manual_seed(0)
    connectors = LTX2TextConnectors(**cfg).eval()
    stacked = torch.randn(2, 16, ltx2_tiny.GEMMA_HIDDEN, ltx2_tiny.GEMMA_LAYERS + 1)
    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[0, 10:], mask[1, 3:] = 1, 1  # left padding, two prompt lengths
    with torch.no_grad():
        want = connectors(stacked.flatten(2, 3), mask, padding_side="left")
        features = ltx2.project_text(connectors, stacked, mask)
        got = ltx2.run_connectors(connectors, features, mask)
    assert features.shape[-1] == (32 + 24 if per_modality else ltx2_tiny.GEMMA_HIDDEN)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_noise_levels_follow_ltx_trainers_stretched_shifted_logit_normal():
    g = torch.Generator().manual_seed(0)
    mean = ltx2.scheduler_shift(2048)
    assert ltx2.scheduler_shift(1024) == pytest.approx(0.95) and ltx2.scheduler_shift(4096) == pytest.approx(2.05)
    s = ltx2.sample_sigmas(200_000, mean, g)
    assert 0.0 <= s.min() and s.max() <= 1.0
    # The stretched logit-normal maps its 0.5th and 99.9th percentiles to 0 and 1: 0.5 % + 0.1 % of its draws are
    # clamped to the ends; with 10 % uniform draws, 0.9 x 0.1 % land exactly at 1.
    assert (s == 1.0).float().mean().item() == pytest.approx(0.0009, abs=0.0003)
    # Median of the logit-normal part, stretched: (sigmoid(mean) - lo) / (hi - lo); uniform draws barely move it.
    lo, hi = torch.sigmoid(torch.tensor(mean - 2.5758)), torch.sigmoid(torch.tensor(mean + 3.0902))
    median = ((torch.sigmoid(torch.tensor(mean)) - lo) / (hi - lo)).item()
    assert s.median().item() == pytest.approx(median, abs=0.02)


def test_video_only_forward_does_not_see_the_audio_stream():
    model = ltx2.load_transformer(make_config(Path("/tmp"), model={"model_source": "tiny-ltx2"}).model)
    b, (f, h, w) = 1, (2, 2, 3)
    batch = {"prompt_embeds": torch.randn(b, 8, 32), "prompt_attention_mask": torch.ones(b, 8, dtype=torch.long),
             "fps": torch.tensor([24.0])}  # fmt: skip
    tokens, t = torch.randn(b, f * h * w, 128), torch.full((b,), 400.0)
    outs = []
    for n_audio in (1, 5):
        audio = torch.randn(b, n_audio, 128)
        v, _ = ltx2.forward_av(model, tokens, t, audio, t, batch, (f, h, w), (t / 1000, t / 1000), with_audio=False)
        outs.append(v)
    assert torch.equal(outs[0], outs[1])
    v_joint, _ = ltx2.forward_av(
        model, tokens, t, torch.randn(b, 5, 128), t, batch, (f, h, w), (t / 1000, t / 1000), True
    )
    assert not torch.allclose(v_joint, outs[0])


# --------------------------------------------------------------------------------------------------
# Preprocessing and training on the bundled clips (3 with sound, 1 without)


def _config(tmp_path: Path, data: Path, **sections):
    raw = {
        "dataset": {"data_folder": str(data), "resolution_buckets": [list(BUCKET)],
                    "preprocessing": {"max_text_length": 32}},
        "model": {"model_source": "tiny-ltx2"},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
        "training": {"steps": 4, "learning_rate": 1e-3, "mixed_precision_mode": "no", "batch_size": 1,
                     "first_frame_conditioning_p": 0.5, "warmup_steps": 1},
        "checkpoints": {"interval": 2, "save_dtype": "fp32"},
    }  # fmt: skip
    for key, values in sections.items():
        raw[key] = {**raw.get(key, {}), **values}
    raw["output_dir"] = str(tmp_path / "outputs")
    return make_config(tmp_path, **raw)


@pytest.fixture(scope="module")
def ltx2_cache(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ltx2")
    data = root / "data"
    shutil.copytree(EXAMPLES, data, ignore=shutil.ignore_patterns(".precomputed"))
    return data, run_preprocess(_config(root, data))


def test_preprocessing_caches_audio_latents_where_the_clip_has_sound(ltx2_cache):
    data, manifest_path = ltx2_cache
    manifest = Manifest.read(manifest_path)
    with_audio = {c.video for c in manifest.clips if c.audio_shape}
    without = {c.video for c in manifest.clips if not c.audio_shape}
    assert len(with_audio) == 3 and len(without) == 1
    frames = ltx2.audio_latent_frames(BUCKET[2], 24.0)  # the examples run at 24 fps
    assert all(c.audio_shape == [8, frames, 16] for c in manifest.clips if c.audio_shape)
    assert any(n["path"] in without and "video-only" in n["reason"] for n in manifest.notes)


def test_worker_threads_write_the_same_audio_and_video_latents(tmp_path):
    """Video and audio VAEs encoding in 2 lanes at once (small clips on the CPU, one lane per torch thread) write
    exactly what one lane alone writes."""
    from safetensors.torch import load_file

    from ltxv_tuner.cache import cache_root, latent_path

    before = torch.get_num_threads()
    written = {}
    try:
        for lanes in (1, 2):
            torch.set_num_threads(lanes)
            data = tmp_path / f"lanes{lanes}"
            shutil.copytree(EXAMPLES, data, ignore=shutil.ignore_patterns(".precomputed"))
            manifest = Manifest.read(run_preprocess(_config(tmp_path, data)))
            written[lanes] = {c.video: load_file(latent_path(cache_root(data), c.latent_key)) for c in manifest.clips}
    finally:
        torch.set_num_threads(before)
    assert sum("audio_latents" in t for t in written[1].values()) == 3
    assert written[1].keys() == written[2].keys()
    for video, tensors in written[1].items():
        assert tensors.keys() == written[2][video].keys()
        for key, value in tensors.items():
            assert torch.equal(value, written[2][video][key]), (video, key)


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_joint_training_logs_both_losses_and_resumes_bit_exact(tmp_path, ltx2_cache):
    data, manifest = ltx2_cache
    straight = tmp_path / "straight"
    training.train(_config(tmp_path, data, training={"steps": 4}), straight, manifest)
    rows = _losses(straight)
    assert any("loss_audio" in r for r in rows) and all("loss_video" in r for r in rows)
    for r in rows:
        parts = r.get("loss_video", 0) + r.get("loss_audio", 0)
        assert r["loss"] == pytest.approx(parts, rel=1e-5)

    resumed = tmp_path / "resumed"
    training.train(_config(tmp_path, data, training={"steps": 2}), resumed, manifest)
    training.train(_config(tmp_path, data, training={"steps": 4}), resumed, manifest, resume_from=resumed)
    a = trainable_from_checkpoint(straight / "checkpoints" / "step_000004")
    b = trainable_from_checkpoint(resumed / "checkpoints" / "step_000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows] == [r["loss"] for r in _losses(resumed)]


def test_training_audio_off_trains_video_only(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data, ignore=shutil.ignore_patterns(".precomputed"))
    cfg = _config(tmp_path, data, training={"steps": 2, "audio": "off"})
    manifest = run_preprocess(cfg)
    assert not any(c.audio_shape for c in Manifest.read(manifest).clips)
    training.train(cfg, tmp_path / "run", manifest)
    assert not any("loss_audio" in r for r in _losses(tmp_path / "run"))


def test_two_process_cpu_run(tmp_path, ltx2_cache):
    data, manifest = ltx2_cache
    cfg = _config(tmp_path, data, training={"distributed": True, "num_processes": 2, "steps": 2})
    result = launch.train(cfg, tmp_path / "run", manifest)
    assert result.final_step == 2
    rows = _losses(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


# --------------------------------------------------------------------------------------------------
# Config: family defaults and refusals, before any work


def test_ltx2_pads_prompts_to_1024_unless_set_and_refuses_what_it_cannot_do(tmp_path):
    from ltxv_tuner.config import validate_config
    from ltxv_tuner.errors import UserError

    named = validate_config({"dataset": {"data_folder": str(tmp_path)}, "model": {"model_source": "LTX23_22B_DEV"}})
    assert named.dataset.preprocessing.max_text_length == 1024
    ltxv = validate_config({"dataset": {"data_folder": str(tmp_path)}, "model": {"model_source": "tiny"}})
    assert ltxv.dataset.preprocessing.max_text_length == 128
    odd = _config(tmp_path, tmp_path / "d", dataset={"preprocessing": {"max_text_length": 36}})
    with pytest.raises(UserError, match="max_text_length: 36 is not a multiple"):
        ltx2.check_config(odd)
    ic = _config(tmp_path, tmp_path / "d", training={"strategy": "ic_lora"}, dataset={"reference_folder": "r"})
    ltx2.check_config(ic)  # IC-LoRA trains on LTX-2 (tests/test_ltx2_ic_lora.py)
    on = make_config(tmp_path, training={"audio": "on"})  # LTXV
    with pytest.raises(UserError, match="no audio"):
        from ltxv_tuner.models import ltxv

        ltxv.check_config(on)

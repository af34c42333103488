"""IC-LoRA (training.strategy: ic_lora) on the tiny model: the strategy's maths, the reference cache, training,
resume, two processes, validation and the bundled quickstart."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from test_preprocess import cache_files, changed
from test_training import make_cache, make_config, record_checksums
from videogen import make_clip

from ltxv_tuner import cache, launch, training
from ltxv_tuner.config import validate_config
from ltxv_tuner.dataset import CachedDataset
from ltxv_tuner.errors import ConfigError, UserError
from ltxv_tuner.models import ltxv, ltxv_tiny
from ltxv_tuner.preprocess import run_preprocess
from ltxv_tuner.strategies import ic_lora, text_to_video
from ltxv_tuner.strategies.flow_matching import flow_matching_loss

BUCKETS = [[128, 96, 17]]


def ic_cfg(data: Path, refs: Path, **sections):
    raw = {
        "dataset": {
            "data_folder": str(data),
            "reference_folder": str(refs),
            "resolution_buckets": BUCKETS,
            "preprocessing": {"max_text_length": 32},
        },
        "model": {"model_source": "tiny"},
        "training": {"strategy": "ic_lora"},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return validate_config(raw)


def add_reference_latents(manifest: Path, seed: int = 1) -> Path:
    """Give every clip of a test cache a reference latent of its own shape (as ic_lora preprocessing does)."""
    root = manifest.parent.parent
    m = cache.Manifest.read(manifest)
    g = torch.Generator().manual_seed(seed)
    for clip in m.clips:
        key = cache.hash_key({"reference": clip.video, "seed": seed})
        cache.save_tensors_atomic(
            cache.latent_path(root, key), {"latents": torch.randn(clip.latent_shape, generator=g)}
        )
        clip.reference, clip.reference_key = clip.video, key
    cache.write_json_atomic(manifest, m.to_json())
    return record_checksums(manifest)


@pytest.fixture
def ic_manifest(tmp_path: Path) -> Path:
    return add_reference_latents(make_cache(tmp_path / "data", clips_per_bucket=4))


def ic_train_cfg(tmp_path: Path, **sections):
    merged = {"training": {"strategy": "ic_lora"}, "dataset": {"reference_folder": str(tmp_path)}}
    for k, v in sections.items():
        merged.setdefault(k, {}).update(v)
    return make_config(tmp_path, **merged)


# --------------------------------------------------------------------------------------------------
# The strategy


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_reference_tokens_are_clean_at_timestep_zero_and_outside_the_target(p):
    cfg = make_config(Path("/unused"), training={"first_frame_conditioning_p": p}).training
    x0, reference = torch.randn(2, 12, 128), torch.randn(2, 12, 128)
    plain = text_to_video.prepare(x0, 4, 1.0, torch.Generator().manual_seed(3), cfg)
    ic = ic_lora.prepare(x0, 4, 1.0, torch.Generator().manual_seed(3), cfg, reference)
    assert ic.prepended == 12 and ic.tokens.shape == (2, 24, 128)
    assert torch.equal(ic.tokens[:, :12], reference)  # never noised
    assert torch.equal(ic.timestep[:, :12], torch.zeros(2, 12))  # timestep 0
    # The clip itself is trained exactly as text-to-video: same draws, same target, same loss mask.
    assert torch.equal(ic.tokens[:, 12:], plain.tokens)
    assert torch.equal(ic.target, plain.target) and ic.target.shape == x0.shape
    plain_t = plain.timestep if plain.timestep.ndim == 2 else plain.timestep[:, None].expand(2, 12)
    assert torch.equal(ic.timestep[:, 12:], plain_t)
    if p == 1.0:  # first-frame conditioning of the target still applies
        assert torch.equal(ic.loss_mask, plain.loss_mask) and not ic.loss_mask[:, :4].any()
    # The loss sees only the clip's tokens: whatever the model predicts for the reference does not count.
    pred = torch.randn(2, 24, 128)
    other = pred.clone()
    other[:, :12] = 1e6
    loss = flow_matching_loss(ic_lora.prediction_for_loss(pred, ic), ic.target, ic.loss_mask)
    assert loss == flow_matching_loss(ic_lora.prediction_for_loss(other, ic), ic.target, ic.loss_mask)


def test_reference_positions_equal_the_targets_grid_positions():
    """The video_coords path (used with a prepended reference) gives the same RoPE as diffusers' own grid."""
    tr = ltxv_tiny.build_tiny_transformer().eval()
    x = torch.randn(2, 24, 128)
    batch = {
        "prompt_embeds": torch.randn(2, 8, 32),
        "prompt_attention_mask": torch.ones(2, 8, dtype=torch.long),
        "fps": torch.tensor([24.0, 12.0]),
    }
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        grid_path = ltxv.forward(tr, x, t, batch, (3, 2, 4))
        coords = ltxv._positions((3, 2, 4), batch["fps"], x.device)
        coords_path = tr(
            hidden_states=x,
            encoder_hidden_states=batch["prompt_embeds"],
            timestep=t,
            encoder_attention_mask=batch["prompt_attention_mask"],
            video_coords=coords,
            return_dict=False,
        )[0]
    assert torch.equal(grid_path, coords_path)


def test_the_reference_changes_the_loss_only_through_attention(tmp_path, ic_manifest):
    cfg = ic_train_cfg(tmp_path)
    model = training.prepare_transformer(cfg)
    batch = CachedDataset(ic_manifest, cfg)[[0, 1]]
    losses = []
    for ref in (batch["reference_latents"], batch["reference_latents"] * -1.0):
        with torch.no_grad():
            b = {**batch, "reference_latents": ref}
            losses.append(training.training_step(model, b, torch.Generator().manual_seed(0), cfg).item())
    assert all(math.isfinite(v) for v in losses) and losses[0] != losses[1]


# --------------------------------------------------------------------------------------------------
# Config and preprocessing


def test_ic_lora_needs_a_reference_folder_and_one_reference_video_per_prompt(tmp_path):
    base = {"dataset": {"data_folder": "d"}, "training": {"strategy": "ic_lora"}}
    with pytest.raises(ConfigError, match="dataset.reference_folder: training.strategy ic_lora needs"):
        validate_config(base)
    with pytest.raises(ConfigError, match="reference_videos: give one video per prompt"):
        validate_config(
            {
                "dataset": {"data_folder": "d", "reference_folder": "r"},
                "training": {"strategy": "ic_lora"},
                "validation": {"prompts": ["a", "b"], "reference_videos": ["r.mp4"]},
            }
        )
    with pytest.raises(ConfigError, match="dataset.reference_folder: only used by training.strategy: ic_lora"):
        validate_config({"dataset": {"data_folder": "d", "reference_folder": "r"}})
    with pytest.raises(ConfigError, match="validation.images: not used with training.strategy: ic_lora"):
        validate_config(  # not even all null (text-only): IC-LoRA prompts take reference videos
            {
                "dataset": {"data_folder": "d", "reference_folder": "r"},
                "training": {"strategy": "ic_lora"},
                "validation": {"prompts": ["a", "b"], "reference_videos": ["r.mp4", "s.mp4"], "images": [None, None]},
            }
        )


@pytest.fixture
def paired(tmp_path: Path) -> tuple[Path, Path]:
    data, refs = tmp_path / "data", tmp_path / "refs"
    make_clip(data / "a.mp4", 160, 120, 20, seed=1, caption="clip a")
    make_clip(data / "sub" / "b.mp4", 160, 120, 24, seed=2, caption="clip b")
    make_clip(refs / "a.mkv", 128, 96, 20, seed=11, caption=None)  # any extension, any size: resized like its clip
    make_clip(refs / "sub" / "b.mp4", 160, 120, 24, seed=12, caption=None)
    return data, refs


def test_references_are_cached_with_their_clip_and_edits_re_encode_only_that_reference(paired):
    data, refs = paired
    cfg = ic_cfg(data, refs)
    manifest = cache.Manifest.read(run_preprocess(cfg))
    by_video = {c.video: c for c in manifest.clips}
    assert set(by_video) == {"a.mp4", "sub/b.mp4"}
    assert by_video["a.mp4"].reference == "a.mkv" and by_video["sub/b.mp4"].reference == "sub/b.mp4"
    root = cache.cache_root(data)
    for clip in manifest.clips:
        ref = cache.load_tensors(cache.latent_path(root, clip.reference_key))["latents"]
        assert list(ref.shape) == clip.latent_shape  # same bucket, frames and crop as the clip

    before = cache_files(data)
    make_clip(refs / "a.mkv", 128, 96, 20, seed=99, caption=None)  # the user edits one reference
    new = {c.video: c for c in cache.Manifest.read(run_preprocess(cfg)).clips}
    written = changed(before, cache_files(data))
    assert written == {f"latents/{new['a.mp4'].reference_key}.safetensors"}
    assert new["sub/b.mp4"].reference_key == by_video["sub/b.mp4"].reference_key


def test_missing_orphan_and_short_references_are_reported_by_name(paired, capsys):
    from ltxv_tuner.logs import setup_console_logging

    setup_console_logging(keep_backlog=False)  # the report goes through the package's console, as in a run
    data, refs = paired
    make_clip(data / "c.mp4", 160, 120, 20, seed=3, caption="clip c")  # no reference
    make_clip(refs / "zzz.mp4", 128, 96, 17, seed=4, caption=None)  # no clip
    make_clip(refs / "sub" / "b.mp4", 160, 120, 12, seed=5, caption=None)  # shorter than its clip's 17 frames
    manifest = cache.Manifest.read(run_preprocess(ic_cfg(data, refs)))
    assert [c.video for c in manifest.clips] == ["a.mp4"]
    skipped = {s["path"]: s["reason"] for s in manifest.skipped}
    assert "no reference video c.<video ext>" in skipped["c.mp4"]
    assert "reference @reference/sub/b.mp4 has 12 frames" in skipped["sub/b.mp4"]
    assert "reference without a clip" in skipped["@reference/zzz.mp4"]
    out = capsys.readouterr().out
    assert "c.mp4" in out and "@reference/zzz.mp4" in out and "sub/b.mp4" in out
    with pytest.raises(UserError, match="dataset.strict is on and 3 file"):
        run_preprocess(ic_cfg(data, refs, dataset={"strict": True}))


# --------------------------------------------------------------------------------------------------
# Training


def test_ic_lora_resume_is_bit_exact(tmp_path, ic_manifest):
    straight = training.train(ic_train_cfg(tmp_path, training={"steps": 4}), tmp_path / "straight", ic_manifest)
    run = tmp_path / "resumed"
    training.train(ic_train_cfg(tmp_path, training={"steps": 2}, checkpoints={"interval": 2}), run, ic_manifest)
    more = ic_train_cfg(tmp_path, training={"steps": 4})
    resumed = training.train(more, run, ic_manifest, resume_from=run)
    a = cache.load_tensors(straight.checkpoints[-1].parent / "state" / "trainable.safetensors")
    b = cache.load_tensors(resumed.checkpoints[-1].parent / "state" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.final_loss == resumed.final_loss


def test_resume_refuses_a_change_of_strategy(tmp_path, ic_manifest):
    run = tmp_path / "run"
    training.train(ic_train_cfg(tmp_path, training={"steps": 2}), run, ic_manifest)
    with pytest.raises(UserError, match=r"training.strategy: 'ic_lora' -> 'text_to_video'"):
        training.train(make_config(tmp_path, training={"steps": 3}), run, ic_manifest, resume_from=run)


def test_two_process_cpu_run_in_ic_lora_mode(tmp_path, ic_manifest):
    cfg = ic_train_cfg(tmp_path, training={"distributed": True, "num_processes": 2, "steps": 2})
    result = launch.train(cfg, tmp_path / "run", ic_manifest)
    assert result.final_step == 2 and result.final_loss is not None and math.isfinite(result.final_loss)
    state = (tmp_path / "run" / "checkpoints" / "step_000002" / "state").glob("random_states_*.pkl")
    assert len(list(state)) == 2


# --------------------------------------------------------------------------------------------------
# The quickstart, end to end


def test_quickstart_ic_lora_end_to_end(tmp_path):
    for sub in ("quickstart_data", "quickstart_references"):
        dst = tmp_path / "examples" / sub
        shutil.copytree(REPO / "examples" / sub, dst, ignore=shutil.ignore_patterns(".precomputed"))
    config = (REPO / "configs" / "quickstart_ic_lora.yaml").read_text()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "q.yaml").write_text(config)
    r = run_cli("configs/q.yaml", "training.steps=4", "checkpoints.interval=2", "validation.interval=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = (tmp_path / "outputs" / "quickstart_ic_lora").iterdir()
    for step in ("step_000002", "step_000004"):
        names = {p.name for p in (run / "checkpoints" / step).glob("*.safetensors")}
        assert names == {f"ltxv_lora_{step}.safetensors", f"ltxv_lora_{step}_comfy.safetensors"}
    from safetensors import safe_open

    with safe_open(str(run / "checkpoints" / "step_000004" / "ltxv_lora_step_000004.safetensors"), "pt") as f:
        assert f.metadata()["ltxv_tuner.strategy"] == "ic_lora"
    from ltxv_tuner.video import probe_video

    videos = sorted((run / "validation" / "step_000004").glob("*.mp4"))
    assert [v.name.endswith("_side_by_side.mp4") for v in videos] == [False, True]
    result, side = (probe_video(v) for v in videos)
    assert (result.width, result.height, result.num_frames) == (128, 96, 17)
    assert (side.width, side.height, side.num_frames) == (256, 96, 17)

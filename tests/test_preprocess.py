"""Stage 1 on the tiny model: what is written, what is reused, what is encoded again, and the error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from videogen import make_clip, make_dataset

from ltxv_tuner.cache import Manifest, cache_root, condition_path, latent_path, load_tensors
from ltxv_tuner.config import validate_config
from ltxv_tuner.errors import UserError
from ltxv_tuner.preprocess import find_manifest, run_preprocess

BUCKETS = [[128, 96, 17], [96, 128, 17]]


def make_cfg(folder: Path, buckets=None, **dataset) -> object:
    pre = dataset.pop("preprocessing", {})
    raw = {
        "dataset": {
            "data_folder": str(folder),
            "resolution_buckets": buckets or BUCKETS,
            "preprocessing": {"max_text_length": 32, **pre},
            **dataset,
        },
        "model": {"model_source": "tiny"},
    }
    return validate_config(raw)


def cache_files(folder: Path) -> dict[str, int]:
    """Every latent/condition file -> mtime_ns (rewrites change mtime; atomic renames always do)."""
    root = cache_root(folder)
    out = {}
    for sub in ("latents", "conditions", "decoded"):
        d = root / sub
        if d.is_dir():
            for p in sorted(d.iterdir()):
                out[f"{sub}/{p.name}"] = p.stat().st_mtime_ns
    return out


def changed(before: dict[str, int], after: dict[str, int]) -> set[str]:
    """Files written between two snapshots: new ones and rewritten ones."""
    return {k for k, v in after.items() if before.get(k) != v}


@pytest.fixture()
def two_clips(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    make_clip(folder / "land.mp4", 160, 120, 20, seed=1, caption="a red ball bouncing on a wooden floor")
    make_clip(folder / "port.MKV", 96, 144, 19, seed=2, caption="a blue square sliding across a green field")
    return folder


def test_first_run_writes_latents_conditions_and_manifest(two_clips: Path, capsys):
    cfg = make_cfg(two_clips, id_token="SQUISH")
    mpath = run_preprocess(cfg)
    assert mpath.is_file() and mpath.parent == cache_root(two_clips) / "manifests"
    manifest = Manifest.read(mpath)
    by_video = {c.video: c for c in manifest.clips}
    assert set(by_video) == {"land.mp4", "port.MKV"}
    assert by_video["land.mp4"].bucket == [128, 96, 17]
    assert by_video["port.MKV"].bucket == [96, 128, 17]
    assert by_video["land.mp4"].caption == "SQUISH a red ball bouncing on a wooden floor"
    assert by_video["land.mp4"].fps == pytest.approx(24.0)
    root = cache_root(two_clips)
    for clip in manifest.clips:
        w, h, f = clip.bucket
        lat = load_tensors(latent_path(root, clip.latent_key))["latents"]
        assert list(lat.shape) == [128, (f - 1) // 8 + 1, h // 32, w // 32] == clip.latent_shape
        assert lat.dtype == torch.float32 and torch.isfinite(lat).all()
        cond = load_tensors(condition_path(root, clip.condition_key))
        assert list(cond["prompt_embeds"].shape) == [32, 32]  # [max_text_length, tiny T5 d_model]
        mask = cond["prompt_attention_mask"]
        assert mask.shape == (32,) and mask.dtype == torch.int64
        assert 0 < int(mask.sum()) < 32 and mask[0] == 1 and mask[-1] == 0
    assert len(cache_files(two_clips)) == 4
    out = capsys.readouterr().out
    assert "2 clip(s) ready" in out


def test_second_run_reuses_without_writing(two_clips: Path, capsys):
    cfg = make_cfg(two_clips)
    mpath = run_preprocess(cfg)
    before, manifest_mtime = cache_files(two_clips), mpath.stat().st_mtime_ns
    capsys.readouterr()
    assert run_preprocess(cfg) == mpath
    assert "cache reused" in capsys.readouterr().out
    assert cache_files(two_clips) == before
    assert mpath.stat().st_mtime_ns == manifest_mtime
    assert find_manifest(cfg) == mpath


def test_bucket_change_reencodes_latents_only(two_clips: Path):
    run_preprocess(make_cfg(two_clips))
    before = cache_files(two_clips)
    mpath = run_preprocess(make_cfg(two_clips, buckets=[[128, 96, 9], [96, 128, 9]]))
    written = changed(before, cache_files(two_clips))
    assert written and all(k.startswith("latents/") for k in written)
    assert len(written) == 2
    manifest = Manifest.read(mpath)
    assert sorted(c.latent_shape[1] for c in manifest.clips) == [2, 2]  # 9 frames -> 2 latent frames


def test_find_manifest_before_preprocessing(two_clips: Path):
    with pytest.raises(UserError, match="run preprocessing first"):
        find_manifest(make_cfg(two_clips))


def test_missing_folder(tmp_path: Path):
    with pytest.raises(UserError, match=r"nope does not exist"):
        run_preprocess(make_cfg(tmp_path / "nope"))


def test_empty_folder(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no clips in .*empty.*clip1.mp4 \+ clip1.txt"):
        run_preprocess(make_cfg(tmp_path / "empty"))


def test_no_usable_clip_names_the_reasons(tmp_path: Path):
    folder = tmp_path / "d"
    make_clip(folder / "short.mp4", num_frames=9)  # shorter than every bucket
    make_clip(folder / "nocap.mp4", caption=None)
    with pytest.raises(UserError, match=r"no usable clip.*nocap.mp4: no caption.*short.mp4: too short: 9 frames"):
        run_preprocess(make_cfg(folder))


def test_manifest_is_json_with_settings(tmp_path: Path):
    folder = make_dataset(tmp_path / "d", n=1)
    data = json.loads(run_preprocess(make_cfg(folder)).read_text())
    assert data["settings"]["buckets"] == BUCKETS
    assert data["settings"]["vae"] == data["settings"]["text_encoder"] == "tiny-v1"
    assert set(data["sources"]) == {"clip0.mp4", "clip0.txt"}

"""Stage 1 on the tiny model: what is written, what is reused, what is encoded again, and the error messages."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import videogen as vg
from safetensors.torch import save_file
from videogen import make_clip, make_dataset

from ltxv_tuner.cache import Manifest, cache_root, condition_path, latent_path, load_tensors, read_header
from ltxv_tuner.config import validate_config
from ltxv_tuner.dataset import CachedDataset, CacheFileChanged
from ltxv_tuner.errors import UserError
from ltxv_tuner.logs import setup_console_logging
from ltxv_tuner.models import ltxv as models
from ltxv_tuner.preprocess import find_manifest, run_preprocess
from ltxv_tuner.video import probe_video

BUCKETS = [[128, 96, 17], [96, 128, 17]]


@pytest.fixture(autouse=True)
def console():
    """The report goes to the terminal through the package's console handler, as in a real run."""
    setup_console_logging(keep_backlog=False)


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
    assert data["settings"]["vae"] == data["settings"]["text_encoder"] == "tiny-v2"
    assert set(data["sources"]) == {"clip0.mp4", "clip0.txt"}


# --------------------------------------------------------------------------------------------------
# Incremental: each kind of change encodes exactly what it must


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """Three clips preprocessed once; tests work on copies (copy2 keeps mtimes, so the copy's cache is current)."""
    folder = tmp_path_factory.mktemp("baseline") / "data"
    make_clip(folder / "a.mp4", 128, 96, 17, seed=1, caption="a red ball bouncing")
    make_clip(folder / "b.mov", 96, 128, 17, seed=2, caption="a blue square sliding")
    make_clip(folder / "c.mkv", 160, 120, 18, seed=3, caption="waves rolling onto a beach")
    run_preprocess(make_cfg(folder))
    return folder


@pytest.fixture()
def data(baseline: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(baseline, dst)
    return dst


def by_video(mpath: Path) -> dict[str, object]:
    return {c.video: c for c in Manifest.read(mpath).clips}


def edit_caption(folder: Path, mp):
    (folder / "b.txt").write_text("a blue square sliding fast\n", encoding="utf-8")
    return make_cfg(folder)


def add_clip(folder: Path, mp):
    make_clip(folder / "d.webm", 128, 96, 17, seed=4, caption="a cat jumping over a fence")
    return make_cfg(folder)


def remove_clip(folder: Path, mp):
    (folder / "c.mkv").unlink()
    return make_cfg(folder)


def change_buckets(folder: Path, mp):
    return make_cfg(folder, buckets=[[64, 64, 9], [128, 96, 9], [96, 128, 9]])


def change_id_token(folder: Path, mp):
    return make_cfg(folder, id_token="SQUISH")


def change_model(folder: Path, mp):
    from ltxv_tuner.models import ltxv_facts

    real = ltxv_facts.model_identity
    mp.setattr(ltxv_facts, "model_identity", lambda m: {k: v + "-other" for k, v in real(m).items()})
    return make_cfg(folder)


def vae_tiling(folder: Path, mp):
    return make_cfg(folder, preprocessing={"vae_tiling": True})


def posterior_mode(folder: Path, mp):
    return make_cfg(folder, preprocessing={"vae_posterior": "mode"})


def comfyui_captions(folder: Path, mp):
    return make_cfg(folder, preprocessing={"caption_encoding": "comfyui"})


def touch_only(folder: Path, mp):
    os.utime(folder / "a.mp4")  # new mtime, same bytes: re-hashed, nothing encoded
    return make_cfg(folder)


@pytest.mark.parametrize(
    "change, latents, conditions, videos",
    [
        (edit_caption, set(), {"b.mov"}, {"a.mp4", "b.mov", "c.mkv"}),
        (add_clip, {"d.webm"}, {"d.webm"}, {"a.mp4", "b.mov", "c.mkv", "d.webm"}),
        (remove_clip, set(), set(), {"a.mp4", "b.mov"}),
        (change_buckets, {"a.mp4", "b.mov", "c.mkv"}, set(), {"a.mp4", "b.mov", "c.mkv"}),
        (change_id_token, set(), {"a.mp4", "b.mov", "c.mkv"}, {"a.mp4", "b.mov", "c.mkv"}),
        (change_model, {"a.mp4", "b.mov", "c.mkv"}, {"a.mp4", "b.mov", "c.mkv"}, {"a.mp4", "b.mov", "c.mkv"}),
        (vae_tiling, {"a.mp4", "b.mov", "c.mkv"}, set(), {"a.mp4", "b.mov", "c.mkv"}),
        (posterior_mode, {"a.mp4", "b.mov", "c.mkv"}, set(), {"a.mp4", "b.mov", "c.mkv"}),
        (comfyui_captions, set(), {"a.mp4", "b.mov", "c.mkv"}, {"a.mp4", "b.mov", "c.mkv"}),
        (touch_only, set(), set(), {"a.mp4", "b.mov", "c.mkv"}),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_change_encodes_exactly_what_changed(data: Path, monkeypatch, change, latents, conditions, videos):
    old = by_video(manifest_of(data))
    before = cache_files(data)
    mpath = run_preprocess(change(data, monkeypatch))
    new = by_video(mpath)
    assert set(new) == videos
    expected = {f"latents/{new[v].latent_key}.safetensors" for v in latents}
    expected |= {f"conditions/{new[v].condition_key}.safetensors" for v in conditions}
    assert changed(before, cache_files(data)) == expected
    assert set(before) <= set(cache_files(data))  # nothing deleted without prune (removed clip's files stay)
    for v in videos - latents - conditions:
        if v in old:
            assert (new[v].latent_key, new[v].condition_key) == (old[v].latent_key, old[v].condition_key)


def manifest_of(folder: Path) -> Path:
    (mpath,) = (cache_root(folder) / "manifests").glob("*.json")
    return mpath


def test_damaged_cache_file_is_encoded_again(data: Path, capsys):
    clips = by_video(manifest_of(data))
    bad_latent = latent_path(cache_root(data), clips["a.mp4"].latent_key)
    bad_latent.write_bytes(bad_latent.read_bytes()[:100])  # truncated
    bad_cond = condition_path(cache_root(data), clips["c.mkv"].condition_key)
    save_file({"prompt_embeds": torch.zeros(5, 32)}, str(bad_cond))  # readable but wrong content
    before = cache_files(data)
    run_preprocess(make_cfg(data))
    written = changed(before, cache_files(data))
    assert written == {f"latents/{bad_latent.name}", f"conditions/{bad_cond.name}"}
    assert list(load_tensors(bad_latent)["latents"].shape) == [128, 3, 3, 4]
    assert "repaired 2 damaged cache file(s)" in capsys.readouterr().out


def test_a_cache_file_changed_at_its_size_is_refused_by_training_and_encoded_again(data: Path, capsys):
    """Issue 15: the checksum the manifest records catches what a size check cannot."""
    mpath, cfg = manifest_of(data), make_cfg(data)
    clip = by_video(mpath)["a.mp4"]
    path = latent_path(cache_root(data), clip.latent_key)
    original, want = path.read_bytes(), load_tensors(path)["latents"].clone()
    path.write_bytes(original[:-8] + bytes(8))  # the last two floats zeroed: same size, a readable file
    dataset = CachedDataset(mpath, cfg)
    index = [c.video for c in dataset.clips].index("a.mp4")
    with pytest.raises(CacheFileChanged) as err:
        dataset[[index]]
    assert str(err.value).startswith(f"{path}: this cache file changed since preprocessing wrote it")
    assert "run the preprocess stage again" in str(err.value) and "\n" not in str(err.value)
    capsys.readouterr()
    run_preprocess(cfg)  # what the pipeline runs before training: not "cache reused"
    out = capsys.readouterr().out
    assert "cache reused" not in out and "changed since it was written (its checksum differs)" in out
    assert re.search(r"latents\s+1\s+2\n", out), out
    assert torch.equal(load_tensors(path)["latents"], want)  # encoded again, to the same numbers
    assert CachedDataset(mpath, cfg)[[index]]["latents"].shape[0] == 1


def test_a_manifest_from_before_checksums_keeps_working_and_gets_them_when_next_written(data: Path, capsys):
    mpath, cfg = manifest_of(data), make_cfg(data)
    raw = json.loads(mpath.read_text())
    recorded = raw.pop("checksums")
    assert len(recorded) == 6 and all(re.fullmatch(r"crc32:[0-9a-f]{8}", c) for c in recorded.values())
    mpath.write_text(json.dumps(raw))
    dataset = CachedDataset(mpath, cfg)
    same_bucket = [i for i, c in enumerate(dataset.clips) if c.video in ("a.mp4", "c.mkv")]
    assert dataset[same_bucket]["latents"].shape[0] == 2  # checked by size, as before
    before = cache_files(data)
    capsys.readouterr()
    run_preprocess(cfg)
    assert cache_files(data) == before  # nothing encoded again
    assert re.search(r"latents\s+0\s+3\n", capsys.readouterr().out)
    assert Manifest.read(mpath).checksums == recorded


def test_prune_deletes_only_unreferenced(data: Path):
    old = by_video(manifest_of(data))
    (data / "c.mkv").unlink()
    mpath = run_preprocess(make_cfg(data, preprocessing={"prune": True}))
    left = set(cache_files(data))
    kept = {f"latents/{c.latent_key}.safetensors" for c in by_video(mpath).values()}
    kept |= {f"conditions/{c.condition_key}.safetensors" for c in by_video(mpath).values()}
    assert left == kept and len(left) == 4
    assert f"latents/{old['c.mkv'].latent_key}.safetensors" not in left


def test_strict_turns_skips_into_an_error(data: Path):
    (data / "b.txt").write_bytes(b"")
    with pytest.raises(UserError, match=r"dataset.strict is on and 1 file\(s\) would be skipped: b.txt: caption"):
        run_preprocess(make_cfg(data, strict=True))
    run_preprocess(make_cfg(data))  # not strict: trains without it
    assert set(by_video(manifest_of(data))) == {"a.mp4", "c.mkv"}


# --------------------------------------------------------------------------------------------------
# Bad inputs, options, kill safety


def test_bad_input_gallery(tmp_path: Path, capsys):
    """Every kind of bad input is skipped with its own one-line reason; the good clips are still cached."""
    d = tmp_path / "data"
    make_clip(d / "good.mp4", 128, 96, 17, seed=1)
    make_clip(d / "rotated.mp4", 128, 96, 17, seed=2, rotation=90)  # shown portrait
    make_clip(d / "multiline.mkv", 128, 96, 17, seed=3, caption="a red ball\r\nbouncing high")
    (d / "bom.txt").write_bytes("\ufeffa ball with a BOM\r\n".encode())
    make_clip(d / "bom.mp4", 96, 128, 17, seed=4, caption=None)
    cases = {
        "zero.mp4": (vg.make_zero_byte, "empty file (0 bytes)"),
        "truncated.mp4": (lambda p: vg.make_truncated(p, num_frames=17), "not a readable video"),
        "corrupt.mkv": (lambda p: vg.make_corrupt(p, num_frames=17), "cannot decode the video stream"),
        "text.avi": (vg.make_not_a_video, "not a readable video"),
        "audio.m4v": (vg.make_audio_only, "no video stream"),
    }
    for name, (maker, _) in cases.items():
        maker(d / name)
        (d / name).with_suffix(".txt").write_text("a caption\n", encoding="utf-8")
    make_clip(d / "short.mp4", num_frames=9)
    make_clip(d / "nocaption.webm", caption=None)
    make_clip(d / "empty_caption.mp4", seed=5, caption="")
    make_clip(d / "latin1.mp4", seed=6, caption=None)
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    make_clip(d / "twin.mp4", seed=7)
    make_clip(d / "twin.mov", seed=8, caption=None)
    (d / "orphan.txt").write_text("no video here\n", encoding="utf-8")

    manifest = Manifest.read(run_preprocess(make_cfg(d)))
    clips = {c.video: c for c in manifest.clips}
    assert set(clips) == {"good.mp4", "rotated.mp4", "multiline.mkv", "bom.mp4"}
    assert clips["rotated.mp4"].bucket == [96, 128, 17]
    assert clips["multiline.mkv"].caption == "a red ball bouncing high"
    assert clips["bom.mp4"].caption == "a ball with a BOM"
    skipped = {s["path"]: s["reason"] for s in manifest.skipped}
    for name, (_, reason) in cases.items():
        assert reason in skipped[name], name
    assert skipped["short.mp4"] == "too short: 9 frames, the shortest bucket needs 17"
    assert skipped["nocaption.webm"] == "no caption file nocaption.txt beside it"
    assert skipped["empty_caption.txt"].startswith("caption file is empty")
    assert skipped["latin1.txt"].startswith("caption is not UTF-8")
    assert skipped["twin.mp4"].startswith("ambiguous") and skipped["twin.mov"].startswith("ambiguous")
    assert len(skipped) == 11
    notes = {n["path"]: n["reason"] for n in manifest.notes}
    assert notes == {
        "orphan.txt": "caption without a video (orphan), ignored",
        "multiline.txt": "caption has 2 lines, joined with spaces",
    }
    out = capsys.readouterr().out
    assert "skipped 11:" in out and "zero.mp4: empty file (0 bytes)" in out
    # Unchanged bad files are not opened again: the second run is the no-work fast path.
    run_preprocess(make_cfg(d))
    assert "cache reused" in capsys.readouterr().out


def test_sampled_posterior_is_seeded_per_clip_and_differs_from_the_mode(data: Path):
    """The default draws from the VAE posterior (as LTX-Video-Trainer); encoding a clip again gives the same bits,
    and the draw is a real one: it differs from the posterior mean (vae_posterior: mode)."""
    root = cache_root(data)
    clip = by_video(manifest_of(data))["a.mp4"]
    path = latent_path(root, clip.latent_key)
    sampled = load_tensors(path)["latents"]
    path.unlink()
    run_preprocess(make_cfg(data))
    assert torch.equal(load_tensors(path)["latents"], sampled)
    mode_clip = by_video(run_preprocess(make_cfg(data, preprocessing={"vae_posterior": "mode"})))["a.mp4"]
    mode = load_tensors(latent_path(root, mode_clip.latent_key))["latents"]
    assert mode_clip.latent_key != clip.latent_key
    assert torch.isfinite(sampled).all() and (sampled - mode).abs().mean() > 1e-3


def test_caption_embeddings_equal_ltx_pipeline_encode_prompt_bit_for_bit(tmp_path: Path):
    """Default caption_encoding and max_text_length: the cached embeddings and mask are exactly what diffusers'
    LTXPipeline.encode_prompt gives the transformer at inference (its default max_sequence_length, 128)."""
    from diffusers import LTXPipeline

    folder = tmp_path / "data"
    caption = "a red ball bouncing on a wooden floor"
    make_clip(folder / "a.mp4", 128, 96, 17, seed=1, caption=caption)
    cfg = validate_config({"dataset": {"data_folder": str(folder), "resolution_buckets": [[128, 96, 17]]},
                           "model": {"model_source": "tiny"}})  # fmt: skip
    (clip,) = Manifest.read(run_preprocess(cfg)).clips
    cached = load_tensors(condition_path(cache_root(folder), clip.condition_key))
    tokenizer, encoder = models.load_text_encoder(cfg.model)
    pipe = LTXPipeline(scheduler=models.build_scheduler(), vae=None, text_encoder=encoder, tokenizer=tokenizer,
                       transformer=None)  # fmt: skip
    with torch.no_grad():  # as LTXPipeline.__call__ runs it (T5 takes another kernel path when grads are on)
        embeds, mask, _, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, device="cpu")
    assert cached["prompt_embeds"].shape == (128, 32)
    assert torch.equal(cached["prompt_embeds"], embeds[0].float())
    assert torch.equal(cached["prompt_attention_mask"].bool(), mask[0])


def test_comfyui_caption_encoding_does_not_depend_on_the_padding():
    """caption_encoding comfyui runs T5 with the mask (as ComfyUI's LTXV text encoder): the real tokens' features
    are the same whatever the padding length. diffusers' unmasked encoding depends on it (why the length matters)."""
    cfg = make_cfg(Path("unused"))
    tokenizer, encoder = models.load_text_encoder(cfg.model)
    texts = ["a cat jumping over a fence"]
    n = int(tokenizer(texts, return_tensors="pt").attention_mask.sum())
    out = {}
    for encoding in ("diffusers", "comfyui"):
        for length in (32, 128):
            emb, mask = models.encode_captions(tokenizer, encoder, texts, length, "cpu", encoding)
            assert int(mask.sum()) == n and emb.shape == (1, length, 32)
            out[encoding, length] = emb[0, :n]
    torch.testing.assert_close(out["comfyui", 32], out["comfyui", 128], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out["diffusers", 32], out["diffusers", 128], atol=1e-4)
    assert not torch.allclose(out["comfyui", 128], out["diffusers", 128], atol=1e-4)


def test_batching_and_decode_threads_give_the_same_cache(tmp_path: Path):
    a = make_dataset(tmp_path / "a", n=3)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    ma = Manifest.read(run_preprocess(make_cfg(a)))
    mb = Manifest.read(run_preprocess(make_cfg(b, preprocessing={"batch_size": 2, "num_workers": 2})))
    assert [(c.video, c.latent_key, c.condition_key) for c in ma.clips] == [
        (c.video, c.latent_key, c.condition_key) for c in mb.clips
    ]
    for ca in ma.clips:
        la = load_tensors(latent_path(cache_root(a), ca.latent_key))["latents"]
        lb = load_tensors(latent_path(cache_root(b), ca.latent_key))["latents"]
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
        ea = load_tensors(condition_path(cache_root(a), ca.condition_key))["prompt_embeds"]
        eb = load_tensors(condition_path(cache_root(b), ca.condition_key))["prompt_embeds"]
        torch.testing.assert_close(ea, eb, rtol=1e-4, atol=1e-4)


@pytest.fixture
def torch_threads() -> Iterator[Callable[[int], None]]:
    """Sets torch's intra-op threads for the test (parallel test workers run 1), restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("lanes", [True, False], ids=["cpu-lanes", "one-encoder"])
def test_worker_and_thread_counts_give_bit_identical_cache_files(tmp_path: Path, monkeypatch, torch_threads, lanes):
    """Small clips on the CPU encode in one lane per torch thread, one torch thread each: 1 or 2 lanes, whatever
    num_workers, write the same bits. With one encoder (big clips, or a GPU), 0 or 3 decode threads (and the
    automatic default) beside it at 2 torch threads change nothing that is written. torch's count is restored."""
    from ltxv_tuner import encode

    if not lanes:
        monkeypatch.setattr(encode, "LANE_MAX_PIXELS", 0)
    runs = [(2, None), (2, 0), (1, 3)] if lanes else [(2, 0), (2, 3), (2, None)]
    a = make_dataset(tmp_path / "a", n=4)
    written = []
    for threads, workers in runs:
        torch_threads(threads)
        folder = tmp_path / f"t{threads}w{workers}"
        shutil.copytree(a, folder)
        manifest = Manifest.read(run_preprocess(make_cfg(folder, preprocessing={"num_workers": workers})))
        assert torch.get_num_threads() == threads
        root = cache_root(folder)
        written.append({c.video: _file_content(latent_path(root, c.latent_key)) for c in manifest.clips})
    assert len(written[0]) == 4 and written[0] == written[1] == written[2]


@pytest.mark.parametrize("lanes", [True, False], ids=["cpu-lanes", "one-encoder"])
def test_where_clips_are_encoded(tmp_path: Path, monkeypatch, torch_threads, lanes: bool):
    """Small clips on the CPU are encoded by the lanes (worker threads that also decode), one per torch thread, with
    one torch thread each; otherwise the main thread encodes with torch's own thread count while the workers decode.
    A clip that fails while decoding is a reported skip either way."""
    from ltxv_tuner import encode
    from ltxv_tuner.models import ltxv
    from ltxv_tuner.video import VideoError

    if not lanes:
        monkeypatch.setattr(encode, "LANE_MAX_PIXELS", 0)
    real_encode, real_read, seen = ltxv.encode_video, encode.read_clip, []

    def recording(vae, pixels, *args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        time.sleep(0.05)  # every lane gets a clip
        return real_encode(vae, pixels, *args, **kwargs)

    def failing_on_clip2(path, *args):
        if Path(path).name == "clip2.mp4":  # probes fine, breaks mid-stream (as a damaged file can)
            raise VideoError("decoding failed after 3 frames (test)")
        return real_read(path, *args)

    monkeypatch.setattr(ltxv, "encode_video", recording)
    monkeypatch.setattr(encode, "read_clip", failing_on_clip2)
    torch_threads(2)
    folder = make_dataset(tmp_path / "d", n=5)
    manifest = Manifest.read(run_preprocess(make_cfg(folder, preprocessing={"num_workers": 3})))
    assert sorted(c.video for c in manifest.clips) == ["clip0.mp4", "clip1.mp4", "clip3.mp4", "clip4.mp4"]
    skipped = [(s["path"], s["reason"]) for s in manifest.skipped]
    assert skipped == [("clip2.mp4", "decoding failed after 3 frames (test)")]
    assert len(seen) == 4
    threads = {name for name, _ in seen}
    if lanes:
        assert len(threads) == 2 and all(n.startswith("clip-worker") for n in threads)
        assert {n for _, n in seen} == {1}
    else:
        assert threads == {"MainThread"} and {n for _, n in seen} == {2}


def test_lanes_decode_in_rounds_and_never_beside_an_encoding_lane(tmp_path: Path, monkeypatch, torch_threads):
    """CPU lanes decode a round of clips side by side, then encode them side by side: a decode never runs while a
    lane encodes (PyAV's many hand-overs of Python's lock stall beside a VAE). Both lanes do both."""
    from ltxv_tuner import encode
    from ltxv_tuner.models import ltxv

    spans: list[tuple[str, str, float, float]] = []
    real_encode, real_read = ltxv.encode_video, encode.read_clip

    def timed(kind, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spans.append((kind, threading.current_thread().name, t0, time.perf_counter()))

        return run

    monkeypatch.setattr(ltxv, "encode_video", timed("encode", real_encode))
    monkeypatch.setattr(encode, "read_clip", timed("decode", real_read))
    monkeypatch.setattr(encode, "ROUND_PER_LANE", 2)  # 4 clips a round: 3 rounds for 10 clips
    torch_threads(2)
    folder = make_dataset(tmp_path / "d", n=10)
    manifest = Manifest.read(run_preprocess(make_cfg(folder)))
    assert len(manifest.clips) == 10
    decodes = [s for s in spans if s[0] == "decode"]
    encodes = [s for s in spans if s[0] == "encode"]
    assert len(decodes) == len(encodes) == 10
    assert len({s[1] for s in decodes}) == len({s[1] for s in encodes}) == 2
    overlaps = [(d, e) for d in decodes for e in encodes if d[2] < e[3] and e[2] < d[3]]
    assert not overlaps


def test_a_round_holds_at_most_its_share_of_memory():
    from ltxv_tuner import encode

    assert encode.round_size(2, 1, (128, 96, 17)) == 2 * encode.ROUND_PER_LANE
    big = (256, 192, 33)  # the largest lane bucket: 19.5 MB of float32 frames a clip
    n = encode.round_size(2, 1, big)
    assert 2 <= n < 2 * encode.ROUND_PER_LANE and n * 256 * 192 * 33 * 3 * 4 <= encode.ROUND_MAX_BYTES
    assert encode.round_size(4, 64, big) == 4  # never fewer batches than lanes


def _file_content(path: Path) -> tuple[bytes, dict]:
    """Every tensor's bytes and the metadata (safetensors writes metadata keys in a varying order, so the file's
    own bytes are not comparable)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        blob = b"".join(k.encode() + f.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes() for k in f.keys())  # noqa: SIM118
        return blob, f.metadata()


def test_center_sampling_and_decoded_previews(tmp_path: Path):
    d = tmp_path / "data"
    make_clip(d / "long.mp4", 128, 96, 33, seed=1)
    start = Manifest.read(run_preprocess(make_cfg(d)))
    cfg = make_cfg(d, preprocessing={"frame_sampling": "center", "decode_videos": True})
    center = Manifest.read(run_preprocess(cfg))
    assert start.clips[0].latent_key != center.clips[0].latent_key  # other frames, other latent
    assert start.clips[0].condition_key == center.clips[0].condition_key
    preview = cache_root(d) / "decoded" / "long_128x96x17.mp4"
    info = probe_video(preview)
    assert (info.width, info.height, info.num_frames) == (128, 96, 17)


def test_previews_are_named_after_clip_and_bucket_and_follow_bucket_changes(tmp_path: Path, capsys):
    d = tmp_path / "data"
    make_clip(d / "land.mp4", 160, 120, 20, seed=1)
    make_clip(d / "sub" / "port.mov", 96, 144, 19, seed=2)
    decoded = cache_root(d) / "decoded"
    run_preprocess(make_cfg(d, preprocessing={"decode_videos": True}))
    assert sorted(p.name for p in decoded.iterdir()) == ["land_128x96x17.mp4", "sub__port_96x128x17.mp4"]
    out = capsys.readouterr().out
    assert "bucket 128x96x17: 1 clip(s): land.mp4" in out and "bucket 96x128x17: 1 clip(s): sub/port.mov" in out
    assert "decoded 2 preview video(s)" in out

    # Other buckets: the landscape clip moves to 160x128x9, the old previews go instead of piling up.
    buckets = [[160, 128, 9], [96, 128, 17]]
    run_preprocess(make_cfg(d, buckets=buckets, preprocessing={"decode_videos": True}))
    assert sorted(p.name for p in decoded.iterdir()) == ["land_160x128x9.mp4", "sub__port_96x128x17.mp4"]
    out = capsys.readouterr().out
    assert "decoded 1 preview video(s)" in out and "removed 1 old one(s)" in out
    assert probe_video(decoded / "land_160x128x9.mp4").num_frames == 9

    # Back to the first buckets: the cache is reused, but the preview of the moved clip is decoded again.
    run_preprocess(make_cfg(d, preprocessing={"decode_videos": True}))
    assert sorted(p.name for p in decoded.iterdir()) == ["land_128x96x17.mp4", "sub__port_96x128x17.mp4"]
    assert "bucket 128x96x17: 1 clip(s): land.mp4" in capsys.readouterr().out


KILL_SCRIPT = """
import sys
from ltxv_tuner.config import validate_config
from ltxv_tuner.dataset import CacheFileChanged, CachedDataset
from ltxv_tuner.logs import setup_console_logging
from ltxv_tuner.preprocess import run_preprocess
setup_console_logging(keep_backlog=False)  # the report goes through the package's console, as in train.py
cfg = validate_config({"dataset": {"data_folder": sys.argv[1], "resolution_buckets": [[128, 96, 17]],
                                   "preprocessing": {"max_text_length": 32}}, "model": {"model_source": "tiny"}})
run_preprocess(cfg)
"""


def run_script(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(folder)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def cache_contents(folder: Path) -> dict[str, object]:
    """Every cache file; safetensors as (metadata, raw tensor bytes), since their header order is not stable."""
    root = cache_root(folder)
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if p.suffix == ".safetensors":
            out[rel] = (read_header(p)[1], {k: v.numpy().tobytes() for k, v in load_tensors(p).items()})
        else:
            out[rel] = p.read_bytes()
    return out


@pytest.mark.slow  # three fresh processes (~10 s start-up each on a busy 2-core machine)
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path: Path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    make_dataset(ref, n=4)
    shutil.copytree(ref, killed)
    assert run_script(ref).wait(timeout=300) == 0

    proc = run_script(killed)
    lat_dir = cache_root(killed) / "latents"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if lat_dir.is_dir() and any(lat_dir.glob("*.safetensors")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed mid-way"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = len(list(lat_dir.glob("*.safetensors")))
    assert 1 <= partial < 4
    assert not (cache_root(killed) / "manifests").exists()  # the manifest is written last

    rerun = run_script(killed)
    out = rerun.communicate(timeout=300)[0].decode()
    assert rerun.returncode == 0, out
    assert re.search(rf"latents\s+{4 - partial}\s+{partial}\n", out), out  # reused what the killed run finished
    got, want = cache_contents(killed), cache_contents(ref)
    manifests = [k for k in want if k.startswith("manifests/")]
    assert manifests and [k for k in got if k.startswith("manifests/")] == manifests
    for k in manifests:  # same clips, keys and shapes (sources hold each folder's own mtimes)
        assert json.loads(got.pop(k))["clips"] == json.loads(want.pop(k))["clips"]
    got.pop("sources.json"), want.pop("sources.json")
    assert got == want  # every latent and condition: same tensors to the bit, same metadata; no temp files


def test_only_old_temp_files_are_cleaned(tmp_path: Path):
    """A killed run's temp files go; a young one may be another run's write in progress and stays."""
    import os
    import time

    from ltxv_tuner.cache import latents_dir, remove_stale_temp_files

    root = tmp_path / ".precomputed"
    latents_dir(root).mkdir(parents=True)
    old = latents_dir(root) / ".abc.safetensors.x1.tmp"
    young = latents_dir(root) / ".def.safetensors.x2.tmp"
    final = latents_dir(root) / "abc.safetensors"
    for p in (old, young, final):
        p.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert remove_stale_temp_files(root) == 1
    assert not old.exists() and young.exists() and final.exists()


def test_cache_files_get_the_usual_permissions_not_0600(tmp_path: Path):
    """Files go through mkstemp (0600); other users sharing the data folder or loading the weights must read them."""
    from ltxv_tuner.cache import save_tensors_atomic, write_json_atomic

    umask = os.umask(0o022)
    os.umask(umask)
    save_tensors_atomic(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
    write_json_atomic(tmp_path / "b.json", {"a": 1})
    for name in ("a.safetensors", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_find_manifest_refuses_a_cache_older_than_the_folder(two_clips: Path):
    """`--only train` must not silently train on old captions or without a newly added clip."""
    cfg = make_cfg(two_clips)
    run_preprocess(cfg)
    (two_clips / "land.txt").write_text("an edited caption")
    with pytest.raises(UserError, match=r"1 file\(s\) in .* changed since preprocessing \(e\.g\. land\.txt\)"):
        find_manifest(cfg)
    run_preprocess(cfg)
    assert find_manifest(cfg)


def test_missing_relative_folder_says_where_it_was_looked_for(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"read from the current folder {re.escape(str(tmp_path))}"):
        run_preprocess(make_cfg(Path("data/videos")))


def test_per_file_faults_are_reported_skips_and_the_other_clips_are_encoded(tmp_path: Path, monkeypatch, capsys):
    """An unreadable subfolder, a file name that is not UTF-8, an unreadable caption and an unreadable video each
    become one reported skip (by name), and never stop the other clips. Tests run as root here, so the permission
    failures are injected at the OS call; the bad file name is real."""
    folder = make_dataset(tmp_path / "data", n=2)
    make_clip(folder / "locked" / "inner.mp4", caption="a clip in an unreadable folder")
    make_clip(folder / "cap.mp4", seed=3, caption="its caption cannot be read")
    make_clip(folder / "vid.mp4", seed=4, caption="its video cannot be read")
    bad = os.path.join(os.fsencode(folder), b"bad\xff.mp4")
    with open(bad, "wb") as f:
        f.write(b"not read")
    real_scandir, real_read_bytes = os.scandir, Path.read_bytes

    def scandir(path="."):
        if os.fsdecode(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    def read_bytes(self):
        if self.name == "cap.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    real_sha = __import__("ltxv_tuner.preprocess", fromlist=["_sha256"])._sha256

    def sha256(path):
        if path.name == "vid.mp4":
            raise PermissionError(13, "Permission denied", str(path))
        return real_sha(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr("ltxv_tuner.preprocess._sha256", sha256)
    manifest = Manifest.read(run_preprocess(make_cfg(folder)))
    assert sorted(c.video for c in manifest.clips) == ["clip0.mp4", "clip1.mp4"]
    skipped = {s["path"]: s["reason"] for s in manifest.skipped}
    assert skipped["locked/"].startswith("cannot read this folder (Permission denied)")
    assert skipped["bad\\xff.mp4"] == "file name is not valid UTF-8; rename it (e.g. plain ASCII)"
    assert skipped["cap.txt"].startswith("cannot read the caption (Permission denied)")
    assert skipped["vid.mp4"].startswith("cannot read the video (Permission denied)")
    out = capsys.readouterr().out
    for name in ("locked/", "bad\\xff.mp4", "cap.txt", "vid.mp4"):
        assert name in out
    with pytest.raises(UserError, match="dataset.strict is on and 4 file"):
        run_preprocess(make_cfg(folder, strict=True))


def test_disk_full_while_writing_latents_is_one_line_and_a_rerun_encodes_only_what_is_missing(tmp_path, monkeypatch):
    """Latent files are written on a background thread: a full disk still stops the run with one line naming the
    file, leaves no temp file, keeps every file written before it, and the rerun encodes only the rest."""
    import errno

    from ltxv_tuner import cache

    d = make_dataset(tmp_path / "data", n=5)
    cfg = make_cfg(d, buckets=[[128, 96, 17]], preprocessing={"num_workers": 2})
    real, calls = cache.save_file, []

    def save_file(tensors, path, metadata=None):
        if "latents" in tensors:
            calls.append(path)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(cache, "save_file", save_file)
    with pytest.raises(UserError, match=r"(?i)disk.*full|no space") as err:
        run_preprocess(cfg)
    assert len(str(err.value).splitlines()) == 1 and ".safetensors" in str(err.value)
    root = cache_root(d)
    kept = sorted((root / "latents").glob("*.safetensors"))
    assert len(kept) >= 2 and not list(root.rglob("*.tmp"))
    before = {p: p.stat().st_mtime_ns for p in kept}
    monkeypatch.undo()
    manifest = Manifest.read(run_preprocess(cfg))
    assert len(manifest.clips) == 5
    assert {p: p.stat().st_mtime_ns for p in kept} == before  # written before the failure: reused, not rewritten


def test_the_device_of_a_cpu_only_torch_is_read_without_asking_torch(tmp_path, monkeypatch):
    """The cache keys' dtype follows the device. A CPU-only build of torch is recognised from its version.py (no
    import); any other build is asked whether it sees a GPU."""
    import importlib.util

    from ltxv_tuner import preprocess

    pkg = tmp_path / "torch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: importlib.machinery.ModuleSpec(
        name, None, origin=str(pkg / "__init__.py")))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    (pkg / "version.py").write_text("cuda: Optional[str] = None\nhip: Optional[str] = None\n")
    assert preprocess._device() == "cpu"  # a CPU-only build: torch.cuda was never asked
    (pkg / "version.py").write_text("cuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n")
    assert preprocess._device() == "cuda"
    (pkg / "version.py").write_text("cuda: Optional[str] = None\nhip: Optional[str] = '6.4.1'\n")
    assert preprocess._device() == "cuda"  # ROCm builds answer through torch.cuda as well
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert preprocess._device() == "cpu"  # a CUDA build without a usable GPU


def test_frames_converted_on_the_device_give_the_same_cache_files(tmp_path: Path, monkeypatch):
    """On a GPU, frames cross to the device as uint8 and are converted there: the same pixels reach the VAE as when
    the decode threads convert them (checked here on the CPU, through the same code path)."""
    from ltxv_tuner import encode

    a = make_dataset(tmp_path / "a", n=3)
    shutil.copytree(a, tmp_path / "b")
    plain = Manifest.read(run_preprocess(make_cfg(a, preprocessing={"batch_size": 2})))
    monkeypatch.setattr(encode, "convert_on_device", lambda device: True)
    moved = Manifest.read(run_preprocess(make_cfg(tmp_path / "b", preprocessing={"batch_size": 2})))
    assert len(plain.clips) == len(moved.clips) == 3
    files = [{c.video: _file_content(latent_path(cache_root(d), c.latent_key)) for c in m.clips}
             for d, m in ((a, plain), (tmp_path / "b", moved))]  # fmt: skip
    assert files[0] == files[1]

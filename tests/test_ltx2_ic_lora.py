"""IC-LoRA on LTX-2 (tiny-ltx2): reference positions as the transformer, ltx-trainer and LTX2InContextPipeline place
them, reference tokens clean and out of the loss, references cached at the downscaled bucket, the refusals, the
`reference_downscale_factor` metadata and the bundled quickstart end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, run_cli
from safetensors import safe_open
from test_preprocess import cache_files, changed
from test_training import make_config

from ltxv_tuner import cache
from ltxv_tuner.errors import ConfigError, UserError
from ltxv_tuner.models import ltx2, ltx2_tiny, ltxv
from ltxv_tuner.preprocess import run_preprocess
from ltxv_tuner.strategies import ic_lora

DATA = REPO / "examples" / "quickstart_ltx2_data"
REFERENCES = REPO / "examples" / "quickstart_ltx2_references"
GRID, FPS = (3, 4, 6), 24.0  # latent grid of a 192x128x17 clip


def ic_config(tmp_path: Path, downscale: int = 2, buckets=((192, 128, 17),), **sections):
    merged = {
        "model": {"model_source": "tiny-ltx2"},
        "dataset": {"reference_folder": str(tmp_path / "refs"), "reference_downscale": downscale,
                    "preprocessing": {"max_text_length": 32}},
        "training": {"strategy": "ic_lora", "first_frame_conditioning_p": 0.0},
    }  # fmt: skip
    for key, values in sections.items():
        merged[key] = {**merged.get(key, {}), **values}
    return make_config(tmp_path, buckets=buckets, **merged)


def rope_input(transformer) -> list[torch.Tensor]:
    """The video positions each call of `transformer` hands its RoPE (captured by a hook)."""
    seen = []
    transformer.rope.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen


# --------------------------------------------------------------------------------------------------
# Positions


def test_target_positions_are_what_the_transformer_computes_itself(tmp_path):
    """The clip's half of `video_coords` is exactly what the transformer builds from num_frames/height/width/fps
    (so no position is invented here); with reference_downscale 1 the reference sits on the same grid."""
    tr = ltx2.load_transformer(ic_config(tmp_path).model).eval()
    seen = rope_input(tr)
    n = GRID[0] * GRID[1] * GRID[2]
    batch = {"prompt_embeds": torch.randn(2, 32, 32), "prompt_attention_mask": torch.ones(2, 32, dtype=torch.long),
             "fps": torch.tensor([FPS, FPS])}  # fmt: skip
    with torch.no_grad():  # text-to-video: the transformer computes the positions from the grid and the fps
        ltx2.forward(tr, torch.randn(2, n, 128), torch.full((2,), 500.0), batch, GRID)
    own = seen[0]
    coords = ltx2.video_coords(tr, GRID, FPS, 2, "cpu", reference_grid=GRID)
    assert coords.shape == (2, 3, 2 * n, 2)
    assert torch.equal(coords[:, :, n:], own)
    assert torch.equal(coords[:, :, :n], own)  # factor 1: the reference takes the clip's positions


def test_downscaled_reference_positions_match_ltx2_in_context_pipeline():
    """Downscale 2: the reference's own latent grid, its height/width positions x 2, its time positions those of the
    clip's frames - what diffusers' LTX2InContextPipeline computes for a reference at half the video's size."""
    from diffusers import LTX2InContextPipeline
    from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition
    from PIL import Image

    tr = ltx2_tiny.build_transformer().eval()
    pipe = LTX2InContextPipeline(scheduler=ltx2_tiny.build_scheduler(), vae=ltx2_tiny.build_video_vae(),
                                 audio_vae=None, text_encoder=None, tokenizer=None, connectors=None, transformer=tr,
                                 vocoder=None)  # fmt: skip
    frames = [Image.fromarray(np.full((64, 96, 3), 7 * i, np.uint8)) for i in range(17)]
    _, want, _, _ = pipe.prepare_reference_latents(
        [LTX2ReferenceCondition(frames=frames)], height=128, width=192, num_frames=17, reference_downscale_factor=2,
        frame_rate=FPS, dtype=torch.float32, device=torch.device("cpu"),
    )  # fmt: skip
    ref_grid = (3, 2, 3)
    coords = ltx2.video_coords(tr, GRID, FPS, 1, "cpu", reference_grid=ref_grid)
    n_ref = want.shape[2]
    assert n_ref == 3 * 2 * 3
    assert torch.equal(coords[:, :, :n_ref], want)
    target = coords[:, :, n_ref:].reshape(1, 3, *GRID, 2)
    ref = coords[:, :, :n_ref].reshape(1, 3, *ref_grid, 2)
    assert torch.equal(ref[:, 0, :, 0, 0], target[:, 0, :, 0, 0])  # same time positions, frame by frame
    assert ref[0, 1:, 0, -1, -1, 1].tolist() == [128.0, 192.0]  # the last reference patch ends where the clip does
    with pytest.raises(ValueError, match=r"grid \(3, 2, 2\) is not the clip's grid \(3, 4, 6\) divided by one factor"):
        ltx2.video_coords(tr, GRID, FPS, 1, "cpu", reference_grid=(3, 2, 2))


# --------------------------------------------------------------------------------------------------
# The training step


def _batch(with_audio: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(1, 128, *GRID, generator=g),
        "reference_latents": torch.randn(1, 128, 3, 2, 3, generator=g),
        "prompt_embeds": torch.randn(1, 32, 32, generator=g),
        "prompt_attention_mask": torch.ones(1, 32, dtype=torch.long),
        "fps": torch.tensor([FPS]),
    }
    if with_audio:
        batch["audio_latents"] = torch.randn(1, 8, ltx2.audio_latent_frames(17, FPS), 16, generator=g)
    return batch


@pytest.mark.parametrize("with_audio", [False, True], ids=["video-only", "audio+video"])
def test_reference_tokens_are_clean_at_timestep_zero_and_out_of_the_loss(tmp_path, with_audio):
    cfg = ic_config(tmp_path, training={"first_frame_conditioning_p": 1.0})
    tr = ltx2.load_transformer(cfg.model).eval()
    batch = _batch(with_audio)
    n_ref = 3 * 2 * 3
    seen = {}

    def capture(module, args, kwargs):
        seen.update(kwargs)

    tr.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        loss = ltx2.training_losses(tr, batch, torch.Generator().manual_seed(1), cfg, ic_lora)["loss"]
    reference = ltx2.pack_latents(batch["reference_latents"])
    assert torch.equal(seen["hidden_states"][:, :n_ref], reference)  # never noised
    assert torch.equal(seen["timestep"][:, :n_ref], torch.zeros(1, n_ref))  # timestep 0
    assert (seen["timestep"][:, n_ref : n_ref + 24] == 0).all()  # the clip's first frame (p = 1) too
    assert (seen["timestep"][:, n_ref + 24 :] > 0).all()
    assert torch.equal(seen["video_coords"], ltx2.video_coords(tr, GRID, FPS, 1, "cpu", (3, 2, 3)))
    assert seen["isolate_modalities"] is (not with_audio)  # audio stays as in text-to-video

    def spoil_reference(module, args, kwargs, out):  # whatever the model says for the reference does not count
        video = out[0].clone()
        video[:, :n_ref] = 1e6
        return (video, *out[1:])

    tr.register_forward_hook(spoil_reference, with_kwargs=True)
    with torch.no_grad():
        again = ltx2.training_losses(tr, batch, torch.Generator().manual_seed(1), cfg, ic_lora)["loss"]
    assert torch.isfinite(loss) and torch.equal(loss, again)


# --------------------------------------------------------------------------------------------------
# Preprocessing, refusals


def test_references_are_encoded_at_the_downscaled_bucket_and_factor_1_keeps_the_cache(tmp_path):
    data, refs = tmp_path / "data", tmp_path / "refs"
    data.mkdir()
    for name in ("bouncing_ball.mp4", "sunset.mp4"):  # one clip with sound, one without
        shutil.copy(DATA / name, data / name)
        shutil.copy(DATA / name.replace(".mp4", ".txt"), data)
    shutil.copytree(REFERENCES, refs)
    full = cache.Manifest.read(run_preprocess(ic_config(tmp_path, downscale=1)))
    assert "reference_downscale" not in full.settings  # the settings (manifest, keys) of a full-size cache as before
    root = cache.cache_root(data)
    before = cache_files(data)
    half = cache.Manifest.read(run_preprocess(ic_config(tmp_path, downscale=2)))
    assert half.settings["reference_downscale"] == 2
    for a, b in zip(full.clips, half.clips, strict=True):
        assert a.latent_key == b.latent_key and a.reference_key != b.reference_key  # the clips are shared
        assert list(cache.load_tensors(cache.latent_path(root, a.reference_key))["latents"].shape) == [128, 3, 4, 6]
        ref = cache.load_tensors(cache.latent_path(root, b.reference_key))
        assert list(ref["latents"].shape) == [128, 3, 2, 3] and "audio_latents" not in ref  # video only
    assert any(c.audio_shape for c in half.clips)  # the clip keeps its sound
    assert changed(before, cache_files(data)) == {f"latents/{c.reference_key}.safetensors" for c in half.clips}


def test_a_downscaled_size_that_is_not_a_multiple_of_32_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"references of bucket 96x64x17 at 48x32, not multiples of 32") as e:
        ltx2.check_config(ic_config(tmp_path, buckets=((192, 128, 17), (96, 64, 17))))
    assert "\n" not in str(e.value)
    dims = ic_config(tmp_path, validation={"interval": 2, "prompts": ["a"], "reference_videos": ["r.mp4"],
                                           "video_dims": [160, 128, 17]})  # fmt: skip
    with pytest.raises(UserError, match=r"validation.video_dims 160x128x17 at 80x64"):
        ltx2.check_config(dims)
    ltx2.check_config(ic_config(tmp_path))  # 192x128 / 2 = 96x64: fine
    with pytest.raises(UserError, match="reference_downscale: 2: tiny is an LTX-Video 0.9.x model"):
        ltxv.check_config(ic_config(tmp_path, model={"model_source": "tiny"}))
    with pytest.raises(ConfigError, match="reference_downscale: only used by training.strategy: ic_lora"):
        make_config(tmp_path, dataset={"reference_downscale": 2})


def test_the_cli_refuses_it_before_any_work(tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "quickstart_ltx2_ic_lora.yaml").read_text())
    raw["dataset"] |= {"data_folder": str(DATA), "reference_folder": str(REFERENCES)}
    raw["dataset"]["resolution_buckets"] = [[96, 64, 33]]
    raw["validation"] |= {"video_dims": [192, 128, 33], "reference_videos": [str(REFERENCES / "sunset.mp4")]}
    raw["output_dir"] = str(tmp_path / "out")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    proc = run_cli(str(tmp_path / "c.yaml"))
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout + proc.stderr
    assert "bucket 96x64x33 at 48x32, not multiples of 32" in errors[0]
    assert "stage 1/3" not in proc.stdout + proc.stderr and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# The quickstart, as a user runs it: metadata in both weight files, side-by-side validation with sound


def test_quickstart_ltx2_ic_lora_end_to_end(tmp_path):
    for src in (DATA, REFERENCES):
        shutil.copytree(src, tmp_path / "examples" / src.name, ignore=shutil.ignore_patterns(".precomputed"))
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "quickstart_ltx2_ic_lora.yaml", tmp_path / "configs" / "q.yaml")
    short = ["dataset.resolution_buckets=[[192, 128, 17]]", "validation.video_dims=[192, 128, 17]"]  # faster
    proc = run_cli("configs/q.yaml", "training.steps=2", "checkpoints.interval=2", "validation.interval=2",
                   "validation.inference_steps=2", *short, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "quickstart_ltx2_ic_lora").iterdir()
    step = run / "checkpoints" / "step_000002"
    for name in ("ltxv_lora_step_000002.safetensors", "ltxv_lora_step_000002_comfy.safetensors"):
        with safe_open(str(step / name), "pt") as f:
            meta = f.metadata()
        assert meta["reference_downscale_factor"] == "2" and meta["ltxv_tuner.strategy"] == "ic_lora", name
    result, side = sorted((run / "validation" / "step_000002").glob("*.mp4"))
    assert side.name.endswith("_side_by_side.mp4")
    with av.open(str(result)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (192, 128) and c.streams.audio
    with av.open(str(side)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (384, 128)
    sidecar = yaml.safe_load(result.with_suffix(".txt").read_text())
    assert sidecar["pipeline"].startswith("diffusers LTX2InContextPipeline") and sidecar["reference_downscale"] == 2

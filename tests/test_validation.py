"""Validation videos from the weights being trained, rendered with the model version's inference settings and
decoded back with PyAV; each video's sidecar records what it was rendered with."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_training import make_cache, make_config

from ltxv_tuner import training, validation
from ltxv_tuner.models import ltxv
from ltxv_tuner.models import ltxv_tiny as tiny


def _decode(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _sidecar(mp4):
    return yaml.safe_load(mp4.with_suffix(".txt").read_text(encoding="utf-8"))


@pytest.fixture
def spy_pipeline(monkeypatch):
    """Records each pipeline call's arguments and the noise levels its scheduler really sampled at."""
    calls = []
    real = ltxv.validation_pipeline

    def wrapped(*args):
        pipe = real(*args)
        call = pipe.__call__

        class Spy:
            def __getattr__(self, name):
                return getattr(pipe, name)

            def __call__(self, **kwargs):
                out = call(**kwargs)
                calls.append({**kwargs, "used_sigmas": pipe.scheduler.sigmas[:-1].tolist()})
                return out

        return Spy()

    monkeypatch.setattr(ltxv, "validation_pipeline", wrapped)
    return calls


def test_validation_during_training_writes_mp4s_of_the_requested_size(tmp_path):
    manifest = make_cache(tmp_path / "data")
    cfg = make_config(
        tmp_path,
        training={"steps": 2},
        checkpoints={"interval": None},
        validation={"interval": 2, "prompts": ["a red ball", "waves at sunset"], "video_dims": [96, 64, 9],
                    "inference_steps": 2},
        dataset={"id_token": "SQUISH"},
    )  # fmt: skip
    training.train(cfg, tmp_path / "run", manifest)
    folder = tmp_path / "run" / "validation" / "step_000002"
    videos = sorted(folder.glob("*.mp4"))
    assert [p.name for p in videos] == ["00_00_squish_a_red_ball.mp4", "01_00_squish_waves_at_sunset.mp4"]
    for path in videos:
        frames = _decode(path)
        assert len(frames) == 9
        assert frames[0].shape == (64, 96, 3)
        assert _sidecar(path)["prompt"].startswith("SQUISH ")
    assert sorted(p.name for p in folder.glob("*.txt")) == [p.with_suffix(".txt").name for p in videos]
    assert "validation step 2: 2 video(s)" in (tmp_path / "run" / "logs" / "train.log").read_text()


def test_dev_settings_render_and_are_read_back_from_the_sidecar(tmp_path, spy_pipeline):
    """The tiny model counts as a dev version: shifted schedule (LTXPipeline's), guidance 3, decode 0.05 / 0.025."""
    cfg = make_config(tmp_path, validation={"interval": 1, "prompts": ["a ball"], "video_dims": [64, 64, 9],
                                            "inference_steps": 3})  # fmt: skip
    (path,) = validation.run_validation(cfg, training.prepare_transformer(cfg), tmp_path / "run", step=3)
    side = _sidecar(path)
    assert side["inference"] == "dev" and side["mode"] == "text-to-video" and side["step"] == 3
    assert (side["guidance_scale"], side["decode_timestep"], side["decode_noise_scale"]) == (3.0, 0.05, 0.025)
    assert (side["frame_rate"], side["inference_steps"], side["width"], side["frames"]) == (25.0, 3, 64, 9)
    assert side["negative_prompt"] == cfg.validation.negative_prompt and side["caption_encoding"] == "diffusers"
    (call,) = spy_pipeline
    assert call["guidance_scale"] == 3.0 and call["decode_timestep"] == 0.05 and call["frame_rate"] == 25.0
    assert call["used_sigmas"] == pytest.approx(side["sigmas"], abs=1e-6)
    assert side["sigmas"] == pytest.approx(_ltx_pipeline_sigmas(steps=3, width=64, height=64, frames=9), abs=1e-6)


def _ltx_pipeline_sigmas(steps, width, height, frames):
    """The noise levels diffusers' LTXPipeline samples at with LTXV's scheduler (read from a real tiny run)."""
    from diffusers import LTXPipeline

    pipe = LTXPipeline(scheduler=ltxv.build_scheduler(), vae=tiny.build_tiny_vae(),
                       text_encoder=tiny.build_tiny_text_encoder(), tokenizer=tiny.build_tiny_tokenizer(),
                       transformer=tiny.build_tiny_transformer())  # fmt: skip
    pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio = 32, 8
    pipe.set_progress_bar_config(disable=True)
    pipe("a ball", width=width, height=height, num_frames=frames, num_inference_steps=steps, output_type="latent")
    return pipe.scheduler.sigmas[:-1].tolist()


def test_distilled_settings_and_overrides(tmp_path, spy_pipeline, monkeypatch):
    """A distilled version renders Lightricks' fixed 7 noise levels without guidance; a validation.* value that is
    set wins over the version's, the rest stays the version's."""
    monkeypatch.setattr(ltxv, "inference_kind", lambda model_cfg: "distilled")
    cfg = make_config(tmp_path, validation={"interval": 1, "prompts": ["a ball"], "video_dims": [64, 64, 9],
                                            "decode_noise_scale": 0.05, "frame_rate": 24})  # fmt: skip
    (path,) = validation.run_validation(cfg, training.prepare_transformer(cfg), tmp_path / "run", step=1)
    side = _sidecar(path)
    assert side["inference"] == "distilled" and side["sigmas"] == list(ltxv.DISTILLED_SIGMAS)
    assert (side["inference_steps"], side["guidance_scale"], side["negative_prompt"]) == (7, 1.0, None)
    assert (side["decode_timestep"], side["decode_noise_scale"], side["frame_rate"]) == (0.05, 0.05, 24)
    (call,) = spy_pipeline
    assert call["used_sigmas"] == pytest.approx(list(ltxv.DISTILLED_SIGMAS), abs=1e-6)
    assert "negative_prompt_embeds" not in call and call["guidance_scale"] == 1.0
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == 24


def test_image_to_video_validation(tmp_path, spy_pipeline):
    image = tmp_path / "first.png"
    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(image)
    cfg = make_config(
        tmp_path,
        validation={"interval": 1, "prompts": ["a ball"], "images": [str(image)], "video_dims": [64, 64, 17],
                    "inference_steps": 1, "videos_per_prompt": 2},
    )  # fmt: skip
    transformer = training.prepare_transformer(cfg)
    paths = validation.run_validation(cfg, transformer, tmp_path / "run", step=5)
    assert [p.name for p in paths] == ["00_00_a_ball.mp4", "00_01_a_ball.mp4"]
    assert all(len(_decode(p)) == 17 and _decode(p)[0].shape == (64, 64, 3) for p in paths)
    assert transformer.training  # put back in training mode
    side = _sidecar(paths[1])
    assert side["mode"] == "image-to-video" and side["image"] == str(image) and side["seed"] == 43
    assert side["inference_steps"] == 2  # one step is too few for the shifted schedule
    assert all(c["image"] is not None and c["frame_index"] == 0 for c in spy_pipeline)


def test_comfyui_caption_encoding_reaches_the_prompts(tmp_path, spy_pipeline):
    cfg = make_config(tmp_path, validation={"interval": 1, "prompts": ["a ball"], "video_dims": [64, 64, 9],
                                            "inference_steps": 2},
                      dataset={"preprocessing": {"caption_encoding": "comfyui", "max_text_length": 16}})  # fmt: skip
    validation.run_validation(cfg, training.prepare_transformer(cfg), tmp_path / "run", step=1)
    tokenizer, encoder = ltxv.load_text_encoder(cfg.model)
    with torch.no_grad():
        want, _ = ltxv.encode_captions(tokenizer, encoder, ["a ball"], 16, "cpu", "comfyui")
    assert torch.equal(spy_pipeline[0]["prompt_embeds"], want)


def test_write_mp4_round_trip_on_smooth_content(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float32)
    frames = np.broadcast_to(ramp[None, None, :, None], (9, 32, 64, 3)).copy()
    decoded = np.stack(_decode(validation.write_mp4(frames, tmp_path / "v.mp4")))
    assert decoded.shape == (9, 32, 64, 3)
    assert np.abs(decoded.astype(np.float32) / 255 - frames).mean() < 4 / 255


def test_mixed_image_and_text_only_prompts(tmp_path):
    """`images: [first.png, null]`: the first prompt is image-to-video, the second text-to-video, in one run; each
    video is the one an all-image or all-text run makes for that prompt (same seed per prompt index)."""
    image = tmp_path / "first.png"
    Image.fromarray(np.full((64, 64, 3), 230, dtype=np.uint8)).save(image)

    def videos(images, name):
        cfg = make_config(
            tmp_path,
            validation={"interval": 1, "prompts": ["a ball", "a wave"], "images": images, "video_dims": [64, 64, 9],
                        "inference_steps": 2},
        )  # fmt: skip
        torch.manual_seed(0)
        paths = validation.run_validation(cfg, training.prepare_transformer(cfg), tmp_path / name, step=1)
        videos.sidecars = [_sidecar(p) for p in paths]
        return [p.name for p in paths], [np.stack(_decode(p)) for p in paths]

    names, (mixed_i2v, mixed_t2v) = videos([str(image), None], "mixed")
    assert names == ["00_00_a_ball.mp4", "01_00_a_wave.mp4"]
    first, second = videos.sidecars
    assert (first["mode"], first["image"]) == ("image-to-video", str(image))
    assert (second["mode"], second["image"]) == ("text-to-video", None)
    _, (i2v, _) = videos([str(image), str(image)], "all_images")
    _, (t2v_first, t2v) = videos(None, "text_only")
    assert np.array_equal(mixed_i2v, i2v) and np.array_equal(mixed_t2v, t2v)
    assert not np.array_equal(mixed_i2v, t2v_first)  # the image did condition the first video


def test_images_of_the_wrong_length_say_how_to_mix(tmp_path):
    from ltxv_tuner.errors import ConfigError

    with pytest.raises(ConfigError, match=r"got 1 \(null for a text-only prompt, e.g. images: \[first.png, null\]\)"):
        make_config(tmp_path, validation={"prompts": ["a", "b"], "images": ["first.png"]})

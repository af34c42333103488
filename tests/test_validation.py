"""Validation videos from the weights being trained, decoded back with PyAV."""

from __future__ import annotations

import av
import numpy as np
import torch
from PIL import Image
from test_training import make_cache, make_config

from ltxv_tuner import training, validation


def _decode(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


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
    videos = sorted((tmp_path / "run" / "validation" / "step_000002").glob("*.mp4"))
    assert [p.name for p in videos] == ["00_00_squish_a_red_ball.mp4", "01_00_squish_waves_at_sunset.mp4"]
    for path in videos:
        frames = _decode(path)
        assert len(frames) == 9
        assert frames[0].shape == (64, 96, 3)
    assert "validation step 2: 2 video(s)" in (tmp_path / "run" / "logs" / "train.log").read_text()


def test_image_to_video_validation(tmp_path):
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
        return [p.name for p in paths], [np.stack(_decode(p)) for p in paths]

    names, (mixed_i2v, mixed_t2v) = videos([str(image), None], "mixed")
    assert names == ["00_00_a_ball.mp4", "01_00_a_wave.mp4"]
    _, (i2v, _) = videos([str(image), str(image)], "all_images")
    _, (t2v_first, t2v) = videos(None, "text_only")
    assert np.array_equal(mixed_i2v, i2v) and np.array_equal(mixed_t2v, t2v)
    assert not np.array_equal(mixed_i2v, t2v_first)  # the image did condition the first video


def test_images_of_the_wrong_length_say_how_to_mix(tmp_path):
    import pytest

    from ltxv_tuner.errors import ConfigError

    with pytest.raises(ConfigError, match=r"got 1 \(null for a text-only prompt, e.g. images: \[first.png, null\]\)"):
        make_config(tmp_path, validation={"prompts": ["a", "b"], "images": ["first.png"]})

"""PyAV decode: containers, display rotation, variable frame rate, frame ranges, cover+crop, broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import videogen as vg

from ltxv_tuner.video import VideoError, cover_size, probe_video, read_clip, start_index


def mean_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv", ".webm", ".avi", ".M4V"])
def test_every_container_probes_and_decodes(tmp_path: Path, suffix: str):
    src = vg.smooth_frames(128, 96, 11)
    path = vg.write_clip(tmp_path / f"c{suffix}", src, fps=24)
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames, info.rotation) == (128, 96, 11, 0)
    assert info.fps == pytest.approx(24.0, rel=0.01)
    frames, fps = read_clip(path, 128, 96, 9)
    assert tuple(frames.shape) == (9, 96, 128, 3)
    assert mean_abs(frames, src[:9]) < 6  # lossy, but smooth content survives


def test_rotation_is_applied(tmp_path: Path):
    src = vg.smooth_frames(128, 96, 9)  # bright top-left quarter
    path = vg.write_clip(tmp_path / "rot.mp4", src, rotation=90)  # stored landscape, shown portrait
    info = probe_video(path)
    assert (info.width, info.height, info.rotation) == (96, 128, 90)
    frames, _ = read_clip(path, 96, 128, 9)
    shown = np.rot90(src, k=1, axes=(1, 2))  # 90 degrees counter-clockwise
    assert tuple(frames.shape) == (9, 128, 96, 3)
    assert mean_abs(frames, shown) < 6
    assert mean_abs(frames, np.rot90(src, k=-1, axes=(1, 2))) > 20  # the other direction would be wrong


def test_variable_frame_rate_takes_frames_by_order(tmp_path: Path):
    src = vg.smooth_frames(64, 64, 17, seed=3)
    times = [0.0]
    for i in range(1, 17):
        times.append(times[-1] + (0.02 if i % 2 else 0.1))  # 50 fps and 10 fps alternating
    path = vg.write_clip(tmp_path / "vfr.mkv", src, times=times)
    info = probe_video(path)
    assert info.num_frames == 17
    assert info.fps == pytest.approx(16 / times[-1], rel=0.02)  # average, not the nominal 24
    frames, fps = read_clip(path, 64, 64, 17)
    assert fps == pytest.approx(16 / times[-1], rel=0.02)
    assert mean_abs(frames, src) < 6  # every frame, in order, none duplicated or dropped


def test_start_and_center_frames(tmp_path: Path):
    src = vg.smooth_frames(64, 64, 25, seed=1)
    path = vg.write_clip(tmp_path / "long.mp4", src)
    assert start_index(25, 9, "start") == 0 and start_index(25, 9, "center") == 8
    head, _ = read_clip(path, 64, 64, 9, start=0)
    mid, _ = read_clip(path, 64, 64, 9, start=8)
    assert mean_abs(head, src[:9]) < 6 and mean_abs(mid, src[8:17]) < 6
    assert mean_abs(head, mid) > 5


def test_cover_resize_and_center_crop(tmp_path: Path):
    img = np.zeros((96, 256, 3), np.uint8)
    img[:, :80] = (255, 0, 0)  # left and right bars are cropped away
    img[:, 80:176] = (0, 200, 0)
    img[:, 176:] = (0, 0, 255)
    path = vg.write_clip(tmp_path / "wide.mp4", np.stack([img] * 9))
    frames, _ = read_clip(path, 64, 64, 9)  # cover: 256x96 -> 171x64, then the middle 64 columns
    assert tuple(frames.shape) == (9, 64, 64, 3)
    centre = frames[:, :, 8:-8].float().mean(dim=(0, 1, 2))
    assert centre[1] > 150 and centre[0] < 30 and centre[2] < 30
    assert cover_size(256, 96, 64, 64) == (171, 64)
    assert cover_size(96, 128, 128, 96) == (128, 171)


def test_not_enough_frames(tmp_path: Path):
    path = vg.write_clip(tmp_path / "short.mp4", vg.smooth_frames(64, 64, 9))
    with pytest.raises(VideoError, match="only 9 frames decodable, 17 needed"):
        read_clip(path, 64, 64, 17)


@pytest.mark.parametrize(
    "maker, match",
    [
        (vg.make_zero_byte, "empty file"),
        (vg.make_not_a_video, "not a readable video"),
        (vg.make_audio_only, "no video stream"),
        (lambda p: vg.make_truncated(p, num_frames=17), "not a readable video"),
        (lambda p: vg.make_corrupt(p.with_suffix(".mkv"), num_frames=17), "cannot decode"),
    ],
    ids=["zero-byte", "text", "audio-only", "truncated-mp4", "corrupt-mkv"],
)
def test_broken_files_raise_one_line_reason(tmp_path: Path, maker, match):
    path = maker(tmp_path / "bad.mp4")
    with pytest.raises(VideoError, match=match) as exc:
        probe_video(path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("pix_fmt", ["yuv444p", "yuv420p10le"])
def test_high_bit_depth_and_444_clips_decode_like_the_source(tmp_path: Path, pix_fmt: str):
    """Camera/web clips come as 10-bit or 4:4:4 too: they decode to 8-bit RGB close to the source pixels."""
    src = vg.smooth_frames(128, 96, 17, seed=3)
    path = vg.write_clip(tmp_path / f"clip_{pix_fmt}.mp4", src, pix_fmt=pix_fmt)
    frames, fps = read_clip(path, 128, 96, 17)
    assert tuple(frames.shape) == (17, 96, 128, 3) and str(frames.dtype) == "torch.uint8"
    err = np.abs(frames.numpy().astype(np.float32) - src.astype(np.float32)).mean() / 255
    assert err < 0.02, f"{pix_fmt}: mean error {err:.4f}"
    assert fps == pytest.approx(24, rel=0.01)

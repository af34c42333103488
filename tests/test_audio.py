"""Audio for LTX-2: Slaney mel filterbank and log-mel against independent numpy references, PyAV audio reading
(containers, layouts, time spans, missing and broken tracks), write_video with audio, the bundled LTX-2 examples,
and the mel of a bundled clip through a tiny diffusers audio VAE."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import videogen as vg

from ltxv_tuner.audio import (
    AUDIO_SAMPLE_RATE,
    HOP,
    MEL_BINS,
    N_FFT,
    AudioError,
    audio_latent_frames,
    has_audio,
    mel_filterbank,
    mel_for_video,
    mel_frames_for_latents,
    mel_spectrogram,
    read_audio,
)
from ltxv_tuner.video import probe_video, write_video

REPO = Path(__file__).resolve().parents[1]
LTX2_EXAMPLES = REPO / "examples" / "quickstart_ltx2_data"


# ------------------------------------------------------------------------------------------------
# Independent references (librosa's formulas, written out here)


def slaney_hz_to_mel(hz: float) -> float:
    if hz < 1000.0:
        return 3.0 * hz / 200.0
    return 15.0 + 27.0 * math.log(hz / 1000.0) / math.log(6.4)


def slaney_mel_to_hz(mel: float) -> float:
    if mel < 15.0:
        return 200.0 * mel / 3.0
    return 1000.0 * 6.4 ** ((mel - 15.0) / 27.0)


def reference_centres(n_mels: int = 64, sr: int = 16000) -> np.ndarray:
    """n_mels + 2 filter edge/centre frequencies in Hz, evenly spaced in Slaney mels over [0, sr / 2]."""
    top = slaney_hz_to_mel(sr / 2)
    return np.array([slaney_mel_to_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)])


def reference_filterbank(n_fft: int = 1024, n_mels: int = 64, sr: int = 16000) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels, htk=False, norm="slaney").T, one filter at a time."""
    freqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    pts = reference_centres(n_mels, sr)
    fb = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        lo, mid, hi = pts[m], pts[m + 1], pts[m + 2]
        rising = (freqs - lo) / (mid - lo)
        falling = (hi - freqs) / (hi - mid)
        fb[:, m] = np.clip(np.minimum(rising, falling), 0, None) * 2.0 / (hi - lo)
    return fb


def reference_log_mel(wave: np.ndarray) -> np.ndarray:
    """[C, N] -> [C, T, 64] with numpy's rfft: reflect-pad n_fft/2, periodic Hann, hop 160, |X|, mel, log clamp."""
    pad = N_FFT // 2
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    fb = reference_filterbank()
    out = []
    for x in wave.astype(np.float64):
        xp = np.pad(x, pad, mode="reflect")
        starts = range(0, len(xp) - N_FFT + 1, HOP)
        mag = np.abs(np.fft.rfft(np.stack([xp[s : s + N_FFT] * window for s in starts]), axis=1))
        out.append(np.log(np.maximum(mag @ fb, 1e-5)))
    return np.stack(out)


def rms(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.sqrt((x**2).mean()))


# ------------------------------------------------------------------------------------------------
# Test media


def tone(seconds: float, rate: int, channels: int = 1, onset: float = 0.0, freq: float = 440.0) -> np.ndarray:
    """float32 [channels, seconds * rate]: silence, then a 0.5-amplitude sine from `onset` on."""
    t = np.arange(round(seconds * rate)) / rate
    x = np.where(t >= onset, 0.5 * np.sin(2 * np.pi * freq * t), 0.0).astype(np.float32)
    return np.repeat(x[None], channels, axis=0)


def write_av(
    path: Path,
    audio: np.ndarray | None,
    rate: int = 16000,
    audio_codec: str = "aac",
    layout: str | None = None,
    audio_start: float = 0.0,
    num_frames: int = 24,
    fps: int = 24,
) -> Path:
    """A 64x64 clip (H.264, or VP9 in .webm) with an optional audio stream whose first sample is at `audio_start`."""
    webm = path.suffix == ".webm"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libvpx-vp9" if webm else "libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        stream = None
        if audio is not None:
            stream = container.add_stream(audio_codec, rate=rate)
            stream.layout = layout or ("mono" if audio.shape[0] == 1 else "stereo")
            if audio_codec == "vorbis":
                stream.codec_context.options = {"strict": "experimental"}
        for img in vg.smooth_frames(64, 64, num_frames):
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if stream is not None:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio), format="fltp", layout=stream.layout.name)
            frame.sample_rate, frame.pts, frame.time_base = rate, round(audio_start * rate), Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def encoder_exists(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except (av.FFmpegError, ValueError):
        return False
    return True


# ------------------------------------------------------------------------------------------------
# Mel


def test_slaney_filterbank_matches_reference():
    fb = mel_filterbank().numpy()
    ref = reference_filterbank()
    assert fb.shape == (N_FFT // 2 + 1, MEL_BINS) == (513, 64)
    np.testing.assert_allclose(fb, ref, rtol=1e-5, atol=1e-9)
    # A few points by hand: the filter for mel bin m peaks at the FFT bin nearest its centre frequency, and bins
    # far from it are zero.
    pts = reference_centres()
    for m in (0, 10, 30, 63):
        k = int(np.argmax(fb[:, m]))
        assert abs(k * AUDIO_SAMPLE_RATE / N_FFT - pts[m + 1]) <= AUDIO_SAMPLE_RATE / N_FFT
        assert not fb[round(pts[m + 2] * N_FFT / AUDIO_SAMPLE_RATE) + 1 :, m].any()
    assert fb[0, 0] == 0 and fb[-1, -1] == 0  # 0 Hz and Nyquist are the outer edges


@pytest.mark.parametrize("m", [4, 12, 30, 50, 62])
def test_sine_peaks_in_its_mel_bin(m: int):
    pts = reference_centres()
    for freq in (pts[m + 1], pts[m + 1] + 0.25 * (pts[m + 2] - pts[m + 1])):  # the centre, a quarter towards m+1
        wave = torch.from_numpy(tone(1.0, AUDIO_SAMPLE_RATE, channels=2, freq=freq))
        mel = mel_spectrogram(wave)
        assert tuple(mel.shape) == (2, 101, 64)
        profile = mel[:, 5:-5].mean(dim=(0, 1))  # away from the reflect-padded edges
        assert int(profile.argmax()) == m, f"{freq:.1f} Hz"


def test_log_mel_matches_numpy_stft_reference():
    rng = np.random.default_rng(0)
    wave = (0.3 * rng.standard_normal((2, 4321))).astype(np.float32)
    wave[1, 2000:] = 0  # exercises the log floor
    mel = mel_spectrogram(torch.from_numpy(wave))
    ref = reference_log_mel(wave)
    assert tuple(mel.shape) == ref.shape == (2, 1 + 4321 // HOP, 64)
    np.testing.assert_allclose(mel.numpy(), ref, atol=2e-3)
    assert float(mel.min()) == pytest.approx(math.log(1e-5))
    batched = mel_spectrogram(torch.from_numpy(np.stack([wave, wave[::-1].copy()])))
    assert tuple(batched.shape) == (2, 2, 28, 64)  # [B, 2, T, 64], the audio VAE's input layout
    torch.testing.assert_close(batched[0], mel)


def test_lengths_follow_the_pipeline():
    assert audio_latent_frames(33, 24) == 34  # round(34.375)
    assert audio_latent_frames(121, 24) == 126
    assert audio_latent_frames(97, 25.0) == 97
    assert audio_latent_frames(49, 30) == 41  # round(40.83)
    assert [mel_frames_for_latents(n) for n in (1, 2, 34)] == [1, 5, 133]
    wave = torch.zeros(2, round(33 / 24 * AUDIO_SAMPLE_RATE))
    assert mel_spectrogram(wave).shape[1] == 138  # 1 + 22000 // 160: the whole clip, one latent too many
    assert tuple(mel_for_video(wave, 33, 24).shape) == (2, 133, 64)
    with pytest.raises(ValueError, match="mel frames"):
        mel_for_video(wave[:, :10000], 33, 24)


# ------------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize(
    "suffix, codec",
    [(".mp4", "aac"), (".mov", "aac"), (".mkv", "aac"), (".webm", "libopus"), (".webm", "vorbis")],
)
def test_read_audio_containers_time_span_and_mono(tmp_path: Path, suffix: str, codec: str):
    if not encoder_exists(codec):
        pytest.skip(f"no {codec} encoder in this PyAV build")
    rate = 48000 if codec == "libopus" else 16000
    channels = 2 if codec == "vorbis" else 1  # FFmpeg's own vorbis encoder is stereo-only
    path = write_av(tmp_path / f"tone{suffix}", tone(1.0, rate, channels, onset=0.5), rate=rate, audio_codec=codec)
    assert has_audio(path)
    wave = read_audio(path, 0.0, 1.0)
    assert wave.dtype == torch.float32 and tuple(wave.shape) == (2, AUDIO_SAMPLE_RATE)
    torch.testing.assert_close(wave[0], wave[1])  # mono (or identical stereo) on both sides
    sr = AUDIO_SAMPLE_RATE
    assert rms(wave[:, : int(0.4 * sr)]) < 0.01  # before the tone
    assert rms(wave[:, int(0.6 * sr) : int(0.9 * sr)]) == pytest.approx(0.5 / math.sqrt(2), rel=0.1)
    late = read_audio(path, 0.6, 0.3)  # a span in the middle lines up with the same place
    assert tuple(late.shape) == (2, round(0.3 * sr)) and rms(late) == pytest.approx(0.354, rel=0.1)
    assert rms(read_audio(path, 0.1, 0.3)) < 0.01


def test_read_audio_exact_sample_counts(tmp_path: Path):
    path = write_av(tmp_path / "a.mp4", tone(1.2, 44100, 2), rate=44100)
    for duration, rate in [(0.8375, 16000), (33 / 24, 16000), (0.77, 22050), (1.0, 24000), (0.123457, 16000)]:
        assert read_audio(path, 0.05, duration, sample_rate=rate).shape[1] == round(duration * rate)


def test_read_audio_pads_a_short_track_and_fills_a_late_start(tmp_path: Path):
    short = write_av(tmp_path / "short.mp4", tone(0.5, 16000), num_frames=24)  # 1 s of video, 0.5 s of sound
    wave = read_audio(short, 0.0, 1.0)
    assert tuple(wave.shape) == (2, 16000)
    assert rms(wave[:, 1000:7000]) > 0.3 and rms(wave[:, 9000:]) == 0  # the tail is zeros
    for suffix in (".mp4", ".mkv"):
        late = write_av(tmp_path / f"late{suffix}", tone(0.75, 16000), audio_start=0.25)
        wave = read_audio(late, 0.0, 1.0)
        onset = int(np.argmax(wave[0].abs().numpy() > 0.01)) / 16000
        assert onset == pytest.approx(0.25, abs=0.002) and rms(wave[:, : int(0.2 * 16000)]) < 1e-3, suffix
        assert rms(wave[:, int(0.3 * 16000) :]) > 0.3, suffix
    with pytest.raises(AudioError, match="none of"):
        read_audio(short, 0.6, 0.3)


def test_read_audio_downmixes_surround_without_clipping(tmp_path: Path):
    path = write_av(tmp_path / "surround.mp4", tone(1.0, 48000, 6), rate=48000, layout="5.1")
    wave = read_audio(path, 0.0, 1.0)
    assert tuple(wave.shape) == (2, AUDIO_SAMPLE_RATE)
    # Every channel carries the same tone: a normalised downmix keeps its level (FFmpeg's default: 2.4x).
    assert rms(wave[:, 2000:]) == pytest.approx(rms(tone(1.0, 48000)), rel=0.05)


def test_no_audio_stream_and_broken_files(tmp_path: Path):
    silent = vg.make_clip(tmp_path / "silent.mp4", caption=None)
    assert not has_audio(silent)
    assert read_audio(silent, 0.0, 0.5) is None
    with pytest.raises(AudioError, match="empty file"):
        read_audio(vg.make_zero_byte(tmp_path / "empty.mp4"), 0.0, 0.5)
    with pytest.raises(AudioError, match="not a readable"):
        has_audio(vg.make_not_a_video(tmp_path / "text.mp4"))
    # Overwrite the audio packets (found by demuxing) with noise: the stream is there but does not decode.
    path = write_av(tmp_path / "good.mp4", tone(2.0, 16000), num_frames=48)
    with av.open(str(path)) as container:
        spans = [(p.pos, p.size) for p in container.demux(container.streams.audio[0]) if p.size]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for pos, size in spans[5:]:
        data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    assert has_audio(bad)
    with pytest.raises(AudioError, match="cannot decode the audio stream"):
        read_audio(bad, 0.0, 2.0)


# ------------------------------------------------------------------------------------------------
# Writing


@pytest.mark.parametrize(
    "suffix, channels, rate", [(".mp4", 1, 16000), (".mp4", 2, 48000), (".mkv", 2, 24000), (".webm", 1, 16000)]
)
def test_write_video_with_audio_round_trip(tmp_path: Path, suffix: str, channels: int, rate: int):
    frames = vg.smooth_frames(64, 48, 33)
    sound = tone(33 / 24, rate, channels, onset=0.25, freq=330)
    if channels == 2:
        sound[1] *= 0.5  # a quieter right side
    path = tmp_path / f"av{suffix}"
    codec = "libvpx-vp9" if suffix == ".webm" else "libx264"
    write_video(path, torch.from_numpy(frames), 24, codec=codec, audio=torch.from_numpy(sound), sample_rate=rate)
    assert probe_video(path).num_frames == 33
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        expected = ("opus", 48000) if suffix == ".webm" else ("aac", rate)  # webm takes no AAC
        assert (stream.codec_context.name, stream.rate, stream.codec_context.channels) == (*expected, channels)
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(stream)], axis=1)
        container.seek(0)
        last = max(p.pts + p.duration for p in container.demux(stream) if p.size)
        end_s = float(last * stream.time_base)
    frame_s = 1024 / rate if suffix != ".webm" else 0.02  # one AAC frame, or one 20 ms Opus frame
    assert end_s == pytest.approx(33 / 24, abs=frame_s)
    assert decoded.shape[1] / stream.rate == pytest.approx(33 / 24, abs=frame_s)
    for ch in range(channels):
        assert rms(decoded[ch]) == pytest.approx(rms(sound[ch]), rel=0.05)
    wave = read_audio(path, 0.0, 33 / 24, sample_rate=rate)
    assert rms(wave[:, : int(0.2 * rate)]) < 0.01 and rms(wave[0, int(0.3 * rate) :]) > 0.3


def test_write_video_without_audio_or_with_a_bad_waveform(tmp_path: Path):
    frames = vg.smooth_frames(64, 48, 9)
    write_video(tmp_path / "v.mp4", frames, 24)  # existing callers: no audio stream
    assert not has_audio(tmp_path / "v.mp4")
    with pytest.raises(ValueError, match="audio must be"):
        write_video(tmp_path / "x.mp4", frames, 24, audio=torch.zeros(3, 100))


# ------------------------------------------------------------------------------------------------
# Bundled LTX-2 examples


def test_bundled_ltx2_examples():
    clips = sorted(p for p in LTX2_EXAMPLES.iterdir() if p.suffix in (".mp4", ".mov", ".mkv"))
    assert {p.suffix for p in clips} == {".mp4", ".mov", ".mkv"} and len(clips) == 4
    assert sum(p.stat().st_size for p in LTX2_EXAMPLES.iterdir()) < 500_000
    with_audio = []
    for clip in clips:
        assert clip.with_suffix(".txt").read_text(encoding="utf-8").strip()
        info = probe_video(clip)
        assert (info.width, info.height, info.num_frames, info.fps) == (128, 96, 33, 24.0)
        wave = read_audio(clip, 0.0, info.num_frames / info.fps)
        assert has_audio(clip) == (wave is not None)
        if wave is not None:
            assert tuple(wave.shape) == (2, 22000) and rms(wave) > 0.02
            with_audio.append(clip.name)
    assert len(with_audio) == 3, with_audio


def test_bundled_clip_mel_through_tiny_audio_vae():
    from diffusers import AutoencoderKLLTX2Audio

    torch.manual_seed(0)
    # ch_mult of length 3: two stride-2 stages, the 4x the pipeline and decoder assume. base_channels sizes the
    # latent statistics, which the pipeline applies to packed latents of latent_channels * mel_bins / 4 features.
    latent_channels = 2
    vae = AutoencoderKLLTX2Audio(
        base_channels=latent_channels * MEL_BINS // 4, latent_channels=latent_channels, ch_mult=(1, 1, 1),
        num_res_blocks=1, mel_bins=MEL_BINS,
    ).eval()  # fmt: skip
    clip = LTX2_EXAMPLES / "bouncing_ball.mp4"
    info = probe_video(clip)
    wave = read_audio(clip, 0.0, info.num_frames / info.fps)
    mel = mel_for_video(wave, info.num_frames, info.fps)[None]
    latents_wanted = audio_latent_frames(info.num_frames, info.fps)
    assert latents_wanted == 34 and tuple(mel.shape) == (1, 2, mel_frames_for_latents(34), 64)
    with torch.no_grad():
        latents = vae.encode(mel).latent_dist.mode()
        assert tuple(latents.shape) == (1, latent_channels, latents_wanted, MEL_BINS // 4)
        packed = latents.permute(0, 2, 1, 3).flatten(2)  # [B, T, C * 16], as LTX2Pipeline packs them
        assert packed.shape[-1] == vae.latents_mean.shape[0]
        assert tuple(vae.decode(latents).sample.shape) == tuple(mel.shape)  # 4L - 3 mel frames back
        whole = vae.encode(mel_spectrogram(wave)[None]).latent_dist.mode()  # uncut, as ltx-trainer encodes
    assert whole.shape[2] == latents_wanted + 1
    torch.testing.assert_close(whole[:, :, :latents_wanted], latents)  # causal: the cut only drops the tail

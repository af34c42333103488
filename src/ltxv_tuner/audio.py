"""Audio for LTX-2: read a clip's soundtrack with PyAV and turn it into the log-mel input of the audio VAE.

The numbers follow ltx-core (Lightricks/LTX-2 400fd31, `ltx_core/model/audio_vae/ops.py` AudioProcessor and the
audio VAE configurator defaults, which the diffusers 0.42.1 `AutoencoderKLLTX2Audio` config repeats):

- waveform: stereo float at 16 kHz. Mono is duplicated to both channels (ltx-trainer does the same); more than two
  channels are downmixed by FFmpeg's resampler with its matrix normalised to 1, which gives ltx-trainer's 5.1 weights
  (L = 0.414 L + 0.293 C + 0.293 Ls, the LFE dropped) instead of the unnormalised FFmpeg default (up to 2.4x: clips).
- mel: torchaudio MelSpectrogram(n_fft=1024, win_length=1024, hop_length=160, periodic Hann window, center=True,
  pad_mode="reflect", power=1, f_min=0, f_max=8000, 64 mels, mel_scale="slaney", norm="slaney"), then
  log(clamp(min=1e-5)). Done here with torch.stft and our own Slaney filterbank (torchaudio is not a dependency).
  Layout [..., channels, time, mel_bins], e.g. [B, 2, T, 64]: what `AutoencoderKLLTX2Audio.encode` takes (channels
  = stereo, height = time, width = mel), the permute(0, 1, 3, 2) at the end of AudioProcessor.waveform_to_mel.
- time: mel frame j is centred on sample j * 160 (100 frames per second, 1 + N // 160 frames for N samples). The
  audio VAE is causal in time and compresses 4x (two stride-2 convolutions padded 2 before and 0 after), so T mel
  frames give ceil(T / 4) latent frames and latent frame i sees mel frames up to 4i: 4L - 3 mel frames give exactly
  L latents, and the VAE decoder turns L latents back into 4L - 3 mel frames. 25 latent frames per second.
- length: LTX2Pipeline (diffusers) and ltx-core `AudioLatentShape.from_video_pixel_shape` generate
  round(num_frames / fps * 25) audio latent frames for a video. ltx-trainer (scripts/process_videos.py) does not
  cut: it encodes the mel of int(num_frames / fps * 16000) samples whole, which for about two thirds of the 8n+1
  frame counts at 24-60 fps gives one latent frame more than inference uses (35 instead of 34 for 33 frames at
  24 fps). `mel_for_video` cuts the mel to 4L - 3 frames, so training sees the length the pipeline generates; the
  cut drops at most 6 mel frames (60 ms) at the end of the clip. Without mid-block attention (diffusers' default;
  not checked on the released weights) the encoder is causal in time and the kept latents equal the uncut ones.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import av
import numpy as np
import torch

from .video import _short

AUDIO_SAMPLE_RATE = 16000
MEL_BINS = 64
HOP = 160
N_FFT = 1024
LOG_FLOOR = 1e-5
AUDIO_TEMPORAL_COMPRESSION = 4  # mel frames per audio latent frame (LATENT_DOWNSAMPLE_FACTOR in ltx-core/diffusers)
AUDIO_LATENTS_PER_SECOND = AUDIO_SAMPLE_RATE / HOP / AUDIO_TEMPORAL_COMPRESSION  # 25.0
RESAMPLER_LEAD_S = 0.1  # audio resampled before the span, so the resampler's filter has settled at its start


class AudioError(Exception):
    """An audio track that cannot be used; the message is a one-line reason shown in the preprocessing report."""


def _open(path: Path):
    if path.stat().st_size == 0:
        raise AudioError("empty file (0 bytes)")
    try:
        return av.open(str(path), "r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise AudioError(f"not a readable media file ({_short(e)})") from None


def has_audio(path: str | Path) -> bool:
    """Whether the file has an audio stream (reads the header only; says nothing about whether it decodes)."""
    container = _open(Path(path))
    try:
        return len(container.streams.audio) > 0
    finally:
        container.close()


def _timeline_origin(container) -> float:
    """Seconds where the clip's timeline starts: the first video stream's start, else the audio stream's."""
    for stream in (*container.streams.video, *container.streams.audio):
        if stream.start_time is not None and stream.time_base:
            return float(stream.start_time * stream.time_base)
    return 0.0


def read_audio(
    path: str | Path, start_s: float, duration_s: float, sample_rate: int = AUDIO_SAMPLE_RATE
) -> torch.Tensor | None:
    """The clip's sound over [start_s, start_s + duration_s) as stereo float32 [2, round(duration_s * sample_rate)].

    Times are on the clip's timeline, measured from the start of its video stream (an audio track that starts later
    or ends earlier is zero-filled there, e.g. a track a few AAC frames shorter than the video). The first audio
    stream is decoded and resampled with FFmpeg; its samples are placed from the first decoded frame's timestamp
    on, in order. Returns None when the file has no audio stream; raises AudioError when the stream cannot be
    decoded or covers none of the span.
    """
    if start_s < 0 or duration_s <= 0:
        raise ValueError(f"need start_s >= 0 and duration_s > 0, got {start_s} and {duration_s}")
    path = Path(path)
    num_samples = round(duration_s * sample_rate)
    container = _open(path)
    try:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        origin = _timeline_origin(container)
        end_s = start_s + duration_s
        resampler = None
        first_time: float | None = None  # timeline seconds of the first resampled sample
        next_time = 0.0  # where a frame without a timestamp starts: right after the previous one
        chunks: list[np.ndarray] = []
        have = 0
        try:
            for frame in container.decode(stream):
                t = frame.time - origin if frame.time is not None else next_time
                next_time = t + frame.samples / frame.sample_rate
                if resampler is None:
                    if next_time < start_s - RESAMPLER_LEAD_S:
                        continue  # ends before the span: decoded (the decoder needs it), never resampled
                    resampler = _resampler(frame, sample_rate)
                    first_time = t
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    have += out.samples
                if first_time + have / sample_rate >= end_s:
                    break
            if resampler is not None:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray())
        except (av.FFmpegError, ValueError) as e:
            raise AudioError(f"cannot decode the audio stream ({_short(e)})") from None
    finally:
        container.close()
    if first_time is None or not chunks:
        raise AudioError(f"the audio stream holds no sound from {start_s:.2f} s on (it ends at {next_time:.2f} s)")
    wave = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    if wave.shape[0] == 1:
        wave = np.concatenate([wave, wave])  # mono: the same signal on both sides, as ltx-trainer does
    offset = round((start_s - first_time) * sample_rate)  # index in `wave` of the span's first sample
    lo, hi = max(0, offset), min(wave.shape[1], offset + num_samples)
    if hi <= lo:
        covered = f"{first_time:.2f}-{first_time + wave.shape[1] / sample_rate:.2f} s"
        raise AudioError(f"the audio track covers {covered} of the clip, none of {start_s:.2f}-{end_s:.2f} s")
    out = torch.zeros(2, num_samples, dtype=torch.float32)
    out[:, lo - offset : hi - offset] = torch.from_numpy(np.ascontiguousarray(wave[:, lo:hi]))
    return out


def _resampler(frame, sample_rate: int) -> av.AudioResampler:
    channels = frame.layout.nb_channels
    if channels == 1:  # stay mono here: FFmpeg's mono -> stereo puts it at -3 dB on each side
        return av.AudioResampler(format="fltp", layout="mono", rate=sample_rate)
    if channels == 2:
        return av.AudioResampler(format="fltp", layout="stereo", rate=sample_rate)
    # rematrix_maxval=1 normalises the downmix so it cannot clip; for 5.1 these are ltx-trainer's weights.
    return av.AudioResampler(format="fltp", layout="stereo", rate=sample_rate, options={"rematrix_maxval": "1.0"})


# ------------------------------------------------------------------------------------------------
# Log-mel spectrogram (ltx-core AudioProcessor without torchaudio)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's auditory-toolbox scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) / (math.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    logstep = math.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(logstep * (mel - 15.0)), mel * (200.0 / 3))


@functools.lru_cache(maxsize=8)
def mel_filterbank(
    n_freqs: int = N_FFT // 2 + 1,
    n_mels: int = MEL_BINS,
    sample_rate: int = AUDIO_SAMPLE_RATE,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> torch.Tensor:
    """Slaney-scale triangular filters with Slaney area normalisation, float32 [n_freqs, n_mels].

    torchaudio.functional.melscale_fbanks(..., norm="slaney", mel_scale="slaney"), which equals librosa's default
    filterbank: mel points evenly spaced between f_min and f_max, each filter a triangle over its neighbours' centres,
    scaled by 2 / (upper - lower edge in Hz). Computed in float64. Cached: do not modify the result in place.
    """
    f_max = sample_rate / 2.0 if f_max is None else f_max
    all_freqs = np.linspace(0.0, sample_rate // 2, n_freqs)
    f_pts = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    f_diff = np.diff(f_pts)
    slopes = f_pts[None, :] - all_freqs[:, None]  # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    fb *= 2.0 / (f_pts[2 : n_mels + 2] - f_pts[:n_mels])
    return torch.from_numpy(fb.astype(np.float32))


def mel_spectrogram(waveform: torch.Tensor) -> torch.Tensor:
    """Log-mel of a [C, N] or [B, C, N] waveform at 16 kHz -> float32 [C, T, 64] or [B, C, T, 64], T = 1 + N // 160.

    The audio VAE wants [B, 2, T, 64] (stereo, time, mel): pass [B, 2, N] or add the batch dimension afterwards.
    """
    if waveform.ndim not in (2, 3):
        raise ValueError(f"waveform must be [C, N] or [B, C, N], got shape {tuple(waveform.shape)}")
    if waveform.shape[-1] <= N_FFT // 2:
        raise ValueError(f"waveform too short for the mel spectrogram: {waveform.shape[-1]} samples, need > 512")
    lead, n = waveform.shape[:-1], waveform.shape[-1]
    x = waveform.reshape(-1, n).to(torch.float32)
    window = torch.hann_window(N_FFT, dtype=torch.float32, device=x.device)
    spec = torch.stft(
        x, N_FFT, hop_length=HOP, win_length=N_FFT, window=window, center=True, pad_mode="reflect", return_complex=True
    ).abs()  # [BC, 513, T], power 1
    mel = spec.transpose(1, 2) @ mel_filterbank().to(x.device)  # [BC, T, 64]
    return torch.log(torch.clamp(mel, min=LOG_FLOOR)).reshape(*lead, mel.shape[1], MEL_BINS)


# ------------------------------------------------------------------------------------------------
# Lengths: video frames -> audio latent frames -> mel frames


def audio_latent_frames(num_video_frames: int, fps: float) -> int:
    """Audio latent frames LTX-2 generates next to a video: round(duration * 25), as diffusers' LTX2Pipeline and
    ltx-core's AudioLatentShape.from_duration compute it (same expression, so the same float rounding)."""
    return round(num_video_frames / fps * AUDIO_LATENTS_PER_SECOND)


def mel_frames_for_latents(latent_frames: int) -> int:
    """Mel frames that the causal 4x audio VAE encodes into exactly `latent_frames` latents (and decodes them back
    into): 4L - 3."""
    if latent_frames < 1:
        raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
    return AUDIO_TEMPORAL_COMPRESSION * latent_frames - (AUDIO_TEMPORAL_COMPRESSION - 1)


def mel_for_video(waveform: torch.Tensor, num_video_frames: int, fps: float) -> torch.Tensor:
    """The audio VAE input for a clip of `num_video_frames` at `fps`: the log-mel of `waveform` ([C, N] or [B, C, N],
    normally read_audio(path, start_s, num_video_frames / fps)) cut to mel_frames_for_latents(audio_latent_frames()),
    so the VAE gives the pipeline's audio length. A waveform of the clip's duration always has enough frames."""
    mel = mel_spectrogram(waveform)
    need = mel_frames_for_latents(audio_latent_frames(num_video_frames, fps))
    if mel.shape[-2] < need:
        raise ValueError(
            f"waveform of {waveform.shape[-1]} samples gives {mel.shape[-2]} mel frames, {need} needed for "
            f"{num_video_frames} frames at {fps} fps (read {num_video_frames / fps:.3f} s of audio)"
        )
    return mel[..., :need, :]

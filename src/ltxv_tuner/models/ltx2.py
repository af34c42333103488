"""The LTX-2 family (LTX-2, LTX-2.3, LTX-2.5; `tiny-ltx2` for tests): joint audio + video, Gemma text encoder.

What differs from LTXV 0.9.x, and where it is answered here:
- text: Gemma's stacked hidden states go through the aggregate projection (the connectors' `text_proj_in`, or the
  per-modality projections of 2.3) at preprocessing time; the cache holds those features + the mask, and the frozen
  connectors (1-D transformers with learnable registers) run at every training step (`run_connectors`);
- audio: the clip's own audio track -> stereo 16 kHz log-mel -> audio VAE latents, normalised in packed space,
  cached beside the video latents; clips without audio train video-only (cross-modal attention off);
- training: the official trainer's (ltx-trainer) noise levels - a stretched, sequence-shifted logit-normal with 10 %
  uniform draws - drawn per modality; video and audio velocity losses summed; IC-LoRA references prepended at the
  positions ltx-trainer and LTX2InContextPipeline give them (`video_coords`, `dataset.reference_downscale`);
- validation: diffusers' LTX2Pipeline (video with its generated audio track); IC-LoRA: LTX2InContextPipeline.
Loading from every source is in `ltx2_load.py`, key names for original/ComfyUI files in `ltx2_keys.py`.
"""

from __future__ import annotations

import math

import torch

from . import ltx2_load
from .ltx2_facts import audio_mode  # noqa: F401  (re-exported: the family's facts)
from .ltx2_load import (  # noqa: F401  (the family's loaders, re-exported for `models.family`)
    architecture,
    base_checkpoint_metadata,
    count_params,
    load_audio_vae,
    load_connectors,
    load_scheduler,
    load_vae,
    load_vocoder,
    model_identity,
)
from .ltxv import (  # noqa: F401  (same VAE compression, latent layout and token order as LTXV)
    _unwrap,
    caption_token_count,
    decode_latents,
    encode_video,
    latent_shape,
    pack_latents,
    sequence_length,
)

AUDIO_LATENT_CHANNELS = 8
AUDIO_LATENT_MEL = 16
AUDIO_LATENTS_PER_SECOND = 25  # 16 kHz / hop 160 = 100 mel frames per second, 4x time compression in the audio VAE
DEFAULT_MAX_TEXT_LENGTH = 1024  # LTX-2 prompts are left-padded to 1024 Gemma tokens


# Data parallel training: a batch without audio leaves the audio stream and cross-modal attention idle.
PARAMETERS_MAY_GO_UNUSED = True
# The preset to point at when the memory estimate exceeds the GPU.
LOW_VRAM_CONFIG = "configs/ltx2_low_vram.yaml"
# The pipeline validation videos are rendered with (recorded in each video's .txt).
VALIDATION_PIPELINE = "diffusers LTX2Pipeline (LTX2ImageToVideoPipeline with an image), generated audio muxed in"
IC_VALIDATION_PIPELINE = "diffusers LTX2InContextPipeline (reference_conditions), generated audio muxed in"

# --------------------------------------------------------------------------------------------------
# Text: Gemma -> aggregate projection (cached) -> connectors (each step)


class TextFeatures(torch.nn.Module):
    """Gemma + the connectors' aggregate projection: what preprocessing caches. The connectors themselves run in
    training (`run_connectors`); validation hands `gemma` and `connectors` to the diffusers pipeline."""

    def __init__(self, gemma, connectors):
        super().__init__()
        self.gemma, self.connectors = gemma, connectors

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, padding_side: str = "left") -> torch.Tensor:
        out = self.gemma(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        stacked = torch.stack(out.hidden_states, dim=-1)  # [B, L, D, layers + 1]
        return project_text(self.connectors, stacked, mask, padding_side)


def project_text(connectors, stacked: torch.Tensor, mask: torch.Tensor, padding_side: str = "left") -> torch.Tensor:
    """The aggregate projection of LTX2TextConnectors.forward: [B, L, D, layers] -> [B, L, width]. 2.0: one feature
    for both modalities; 2.3 (per-modality projections): video and audio features concatenated on the last axis."""
    from diffusers.pipelines.ltx2.connectors import per_layer_masked_mean_norm, per_token_rms_norm

    c = connectors.config
    if c.per_modality_projections:
        norm = per_token_rms_norm(stacked).flatten(2, 3)
        norm = torch.where(mask.bool().unsqueeze(-1), norm, torch.zeros_like(norm))
        video = connectors.video_text_proj_in(norm * math.sqrt(c.video_hidden_dim / c.caption_channels))
        audio = connectors.audio_text_proj_in(norm * math.sqrt(c.audio_hidden_dim / c.caption_channels))
        return torch.cat([video, audio], dim=-1)
    norm = per_layer_masked_mean_norm(
        text_hidden_states=stacked, sequence_lengths=mask.sum(dim=-1), device=stacked.device,
        padding_side=padding_side, scale_factor=8,
    )  # fmt: skip
    return connectors.text_proj_in(norm)


def feature_widths(connectors) -> tuple[int, int | None]:
    """(video width, audio width or None when both modalities share one feature) of the cached text features."""
    c = connectors.config
    if c.per_modality_projections:
        return c.video_hidden_dim, c.audio_hidden_dim
    return c.caption_channels, None


def run_connectors(connectors, features: torch.Tensor, mask: torch.Tensor):
    """Cached features [B, L, width] + mask [B, L] -> (video context, audio context, video context mask): the rest of
    LTX2TextConnectors.forward after the projection (learnable registers replace the padding)."""
    video_w, audio_w = feature_widths(connectors)
    video = features[..., :video_w]
    audio = features[..., video_w : video_w + audio_w] if audio_w else video
    dtype = video.dtype
    additive = ((mask.to(torch.int64) - 1).to(dtype) * torch.finfo(dtype).max).reshape(mask.shape[0], 1, 1, -1)
    video_ctx, video_mask = connectors.video_connector(video, additive)
    binary = (video_mask < 1e-6).to(torch.int64).reshape(video_ctx.shape[0], video_ctx.shape[1], 1)
    audio_ctx, _ = connectors.audio_connector(audio, additive)
    return video_ctx * binary, audio_ctx, binary.squeeze(-1)


def load_text_encoder(model_cfg, dtype=torch.float32, device="cpu"):
    """(tokenizer, TextFeatures): Gemma and the connectors (their projection is what the cache holds)."""
    tokenizer, gemma = ltx2_load.load_text_encoder(model_cfg, dtype=dtype, device=device)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    connectors = ltx2_load.load_connectors(model_cfg, dtype=dtype, device=device)
    return tokenizer, TextFeatures(gemma.eval(), connectors.eval())


def encode_captions(tokenizer, encoder, texts: list[str], max_len: int, device, encoding: str = "diffusers"):
    """(features [B, max_len, width], mask [B, max_len]) as LTX2Pipeline prepares prompts: stripped, left-padded to
    max_len with BOS, Gemma with the mask, all hidden states, then the aggregate projection. `encoding` is an LTXV
    setting (T5 with or without the mask); LTX-2 has one way."""
    tok = tokenizer(
        [t.strip() for t in texts], padding="max_length", max_length=max_len, truncation=True,
        add_special_tokens=True, return_tensors="pt",
    )  # fmt: skip
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    return encoder(ids, mask, tokenizer.padding_side), tok.attention_mask


def attach_connectors(transformer, connectors) -> None:
    """The frozen connectors travel with the transformer being trained (not a submodule: not in its state dict,
    not wrapped by DDP/FSDP, never trained)."""
    for p in connectors.parameters():
        p.requires_grad_(False)
    _unwrap(transformer).__dict__["_ltx2_connectors"] = connectors.eval()


def connectors_of(transformer, device, dtype):
    model = _unwrap(transformer)
    connectors = model.__dict__.get("_ltx2_connectors")
    if connectors is None:
        raise RuntimeError("the LTX-2 transformer has no connectors attached (load it with models.family)")
    p = next(connectors.parameters())
    if p.device != torch.device(device) or p.dtype != dtype:
        connectors.to(device=device, dtype=dtype)
    return connectors


def load_transformer(model_cfg, dtype=torch.float32, device="cpu"):
    """The transformer, with the frozen text connectors attached (they run at every training step)."""
    transformer = ltx2_load.load_transformer(model_cfg, dtype=dtype, device=device)
    attach_connectors(transformer, ltx2_load.load_connectors(model_cfg, dtype=dtype, device=device))
    return transformer


def frozen_params(model_cfg) -> int:
    """Weights that sit on the GPU beside the transformer during training: the text connectors (~1.4e9 for 2.0,
    ~3.2e9 for 2.3), counted from their config without weights."""
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    config = ltx2_load.component_config(model_cfg, "connectors")
    with torch.device("meta"):
        connectors = LTX2TextConnectors(**{k: v for k, v in config.items() if not k.startswith("_")})
    return sum(p.numel() for p in connectors.parameters())


def embedding_width(transformer) -> int:
    """Width of the cached text features this transformer's connectors take."""
    connectors = _unwrap(transformer).__dict__.get("_ltx2_connectors")
    if connectors is None:
        return _unwrap(transformer).config.caption_channels
    video_w, audio_w = feature_widths(connectors)
    return video_w + (audio_w or 0)


# --------------------------------------------------------------------------------------------------
# Audio latents


def _audio_stats(audio_vae, like: torch.Tensor):
    return (audio_vae.latents_mean.to(like.device, like.dtype), audio_vae.latents_std.to(like.device, like.dtype))


def pack_audio(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, T, M] -> [B, T, C*M], LTX2Pipeline's audio token order."""
    return latents.transpose(1, 2).flatten(2, 3)


def unpack_audio(tokens: torch.Tensor, mel_bins: int = AUDIO_LATENT_MEL) -> torch.Tensor:
    return tokens.unflatten(2, (-1, mel_bins)).transpose(1, 2)


def audio_latent_frames(num_frames: int, fps: float) -> int:
    """Audio latent steps for a clip of num_frames at fps (LTX2Pipeline: duration x 25, rounded)."""
    return max(1, round(num_frames / fps * AUDIO_LATENTS_PER_SECOND))


def check_config(cfg) -> None:
    """Settings the LTX-2 family cannot honour, refused before any work: a text length the connectors' registers
    cannot fill, an IC-LoRA reference size (`dataset.reference_downscale`) that is not a multiple of 32."""
    from ..data import reference_bucket
    from ..errors import UserError

    if cfg.training.strategy == "ic_lora":
        for bucket in cfg.dataset.resolution_buckets:
            reference_bucket(bucket, cfg.dataset.reference_downscale)
        if cfg.validation.interval is not None:
            reference_bucket(cfg.validation.video_dims, cfg.dataset.reference_downscale, "validation.video_dims")
    registers = ltx2_load.component_config(cfg.model, "connectors").get("video_connector_num_learnable_registers")
    max_len = cfg.dataset.preprocessing.max_text_length
    if registers and max_len % registers:
        raise UserError(
            f"dataset.preprocessing.max_text_length: {max_len} is not a multiple of the text connectors' "
            f"{registers} registers; use 1024 (what LTX-2's pipelines pad prompts to)"
        )


def clip_audio(path, start_frame: int, num_frames: int, fps: float):
    """(log-mel [2, T, 64] of the clip's audio over the frames' time span, None) or (None, why there is none)."""
    from .. import audio

    try:
        wave = audio.read_audio(path, start_frame / fps, num_frames / fps)
    except audio.AudioError as e:
        return None, f"audio track unreadable ({e})"
    if wave is None:
        return None, "no audio track"
    return audio.mel_for_video(wave, num_frames, fps), None


def encode_audio(audio_vae, mel: torch.Tensor, frames: int, posterior: str = "mode", seeds=None) -> torch.Tensor:
    """Log-mel [B, 2, T, 64] -> normalised audio latents [B, 8, frames, 16] (normalised in packed space, as the
    pipeline does), cut or zero-padded to `frames` latent steps (the video's time span)."""
    dist = audio_vae.encode(mel).latent_dist
    if posterior == "mode":
        z = dist.mode()
    else:
        shape = dist.mean.shape[1:]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        z = dist.mean + dist.std * noise.to(device=dist.mean.device, dtype=dist.mean.dtype)
    if z.shape[2] >= frames:
        z = z[:, :, :frames]
    else:
        z = torch.nn.functional.pad(z, (0, 0, 0, frames - z.shape[2]))
    mean, std = _audio_stats(audio_vae, z)
    return unpack_audio((pack_audio(z) - mean) / std, z.shape[-1])


def denormalize_audio(audio_vae, latents: torch.Tensor) -> torch.Tensor:
    mean, std = _audio_stats(audio_vae, latents)
    return unpack_audio(pack_audio(latents) * std + mean, latents.shape[-1])


# --------------------------------------------------------------------------------------------------
# Training


def scheduler_shift(seq_len: int) -> float:
    """ltx-trainer's shift of the noise-level distribution: linear from 0.95 at 1024 video tokens to 2.05 at 4096."""
    slope = (2.05 - 0.95) / (4096 - 1024)
    return 0.95 + slope * (seq_len - 1024)


def sample_sigmas(batch_size: int, mean: float, generator: torch.Generator) -> torch.Tensor:
    """ltx-trainer's ShiftedLogitNormalTimestepSampler: sigmoid(N(mean, 1)) stretched so its 0.5th..99.9th
    percentiles span [0, 1] (small values reflected at 1e-3), replaced by a uniform draw 10 % of the time."""
    eps, device = 1e-3, generator.device
    normal = torch.randn(batch_size, generator=generator, device=device) + mean
    lo, hi = torch.sigmoid(torch.tensor(mean - 2.5758)), torch.sigmoid(torch.tensor(mean + 3.0902))
    stretched = (torch.sigmoid(normal) - lo.to(device)) / (hi - lo).to(device)
    stretched = torch.where(stretched >= eps, stretched, 2 * eps - stretched).clamp(0, 1)
    uniform = (1 - eps) * torch.rand(batch_size, generator=generator, device=device) + eps
    pick = torch.rand(batch_size, generator=generator, device=device)
    return torch.where(pick > 0.1, stretched, uniform)


def reference_downscale(grid: tuple[int, int, int], reference_grid: tuple[int, int, int]) -> int:
    """How many times smaller the reference's latent grid is than the clip's, in height and width (ltx-trainer infers
    the factor the same way); ValueError unless it is one whole factor for both."""
    (_, h, w), (_, rh, rw) = grid, reference_grid
    if h % rh or w % rw or h // rh != w // rw:
        raise ValueError(f"reference latent grid {reference_grid} is not the clip's grid {grid} divided by one factor")
    return h // rh


def video_coords(transformer, grid, fps: float, batch_size: int, device, reference_grid=None) -> torch.Tensor:
    """[B, 3, tokens, 2] RoPE positions of the video tokens. The clip's: exactly what the transformer computes itself
    for num_frames/height/width/fps (`rope.prepare_video_coords`: pixel-space patch bounds, causal first-frame shift,
    time / fps). With an IC-LoRA reference prepended, the reference's first: its own latent grid through the same
    function, height and width positions multiplied by the downscale factor, time positions untouched - as ltx-trainer
    (`VideoToVideoStrategy`, flexible `_apply_reference_condition`) and diffusers' LTX2InContextPipeline
    (`_encode_reference_conditions`) place them."""
    rope = _unwrap(transformer).rope
    f, h, w = grid
    target = rope.prepare_video_coords(batch_size, f, h, w, device, fps=fps)
    if reference_grid is None:
        return target
    factor = reference_downscale(grid, reference_grid)
    ref = rope.prepare_video_coords(batch_size, *reference_grid, device, fps=fps)
    ref[:, 1:] = ref[:, 1:] * factor
    return torch.cat([ref, target], dim=2)


def forward_av(transformer, video: torch.Tensor, video_t: torch.Tensor, audio: torch.Tensor, audio_t, batch: dict,
               grid: tuple[int, int, int], sigmas: tuple, with_audio: bool, coords=None):  # fmt: skip
    """The audio-video forward: packed video tokens + their timesteps (x1000, [B] or [B, seq]), packed audio tokens
    [B, T, 128] + timesteps, (video, audio) noise levels [B] (LTX-2.3's prompt modulation; the cross-modal
    attention's modulation takes the other modality's level, `use_cross_timestep` as diffusers' LTX-2 pipelines
    call it and as ltx-core gates it), text contexts from the cached features through the frozen connectors. Without
    audio the modalities are isolated (no cross-modal
    attention): the video stream is then what a video-only model computes. `coords`: the video tokens' positions
    when they are not just the clip's grid (IC-LoRA: `video_coords` with the reference). Returns (video, audio
    velocity)."""
    model = _unwrap(transformer)
    dtype = model.proj_in.weight.dtype
    connectors = connectors_of(transformer, video.device, dtype)
    mask = batch["prompt_attention_mask"]
    with torch.no_grad():
        video_ctx, audio_ctx, ctx_mask = run_connectors(connectors, batch["prompt_embeds"].to(dtype), mask)
    b = video.shape[0]
    f, h, w = grid
    if video_t.ndim == 1:
        video_t = video_t[:, None].expand(b, video.shape[1])
    out = transformer(
        hidden_states=video.to(dtype), audio_hidden_states=audio.to(dtype),
        encoder_hidden_states=video_ctx, audio_encoder_hidden_states=audio_ctx,
        timestep=video_t, audio_timestep=audio_t, sigma=sigmas[0] * 1000.0, audio_sigma=sigmas[1] * 1000.0,
        encoder_attention_mask=ctx_mask, audio_encoder_attention_mask=ctx_mask,
        num_frames=f, height=h, width=w, fps=float(batch["fps"][0]), audio_num_frames=audio.shape[1],
        isolate_modalities=not with_audio, use_cross_timestep=True, video_coords=coords, return_dict=False,
    )  # fmt: skip
    return out[0], out[1]


def forward(transformer, tokens, timestep, batch: dict, grid, reference_grid=None):
    """Video-only forward (the `ModelFamily` contract): one silent audio token, modalities isolated. With
    `reference_grid` the first tokens are an IC-LoRA reference of that latent grid (`video_coords`)."""
    audio = torch.zeros(tokens.shape[0], 1, AUDIO_LATENT_CHANNELS * AUDIO_LATENT_MEL, device=tokens.device)
    t = timestep if timestep.ndim == 1 else timestep.amax(dim=1)
    coords = None
    if reference_grid is not None:
        coords = video_coords(transformer, grid, float(batch["fps"][0]), tokens.shape[0], tokens.device, reference_grid)
    sigmas = (t / 1000.0, t / 1000.0)
    return forward_av(transformer, tokens, timestep, audio, t, batch, grid, sigmas, False, coords)[0]


def training_losses(transformer, batch: dict, generator: torch.Generator, cfg, strategy) -> dict[str, torch.Tensor]:
    """One LTX-2 training forward, as ltx-trainer's `flexible` strategy (its shipped t2v/i2v/v2v configs): the
    strategy noises the video (first-frame conditioning included) at a level from the official sampler shifted for
    the clip's video token count, and prepends an IC-LoRA reference (clean, timestep 0, out of the loss; positions
    from `video_coords`); the audio (when the batch has it) gets its own level, shifted for the audio token count,
    and its own noise; loss = video loss + audio loss. Draw order: video (strategy), audio level, audio noise."""
    from ..strategies.flow_matching import flow_matching_loss, noisy, velocity

    latents = batch["latents"]
    b, _, f, h, w = latents.shape
    x0 = pack_latents(latents.float())
    ref = batch.get("reference_latents")
    reference = pack_latents(ref.float()) if ref is not None else None
    inputs = strategy.prepare(
        x0, h * w, scheduler_shift(f * h * w), generator, cfg.training, reference, sampler=sample_sigmas
    )
    coords = None
    if inputs.prepended:
        coords = video_coords(transformer, (f, h, w), float(batch["fps"][0]), b, x0.device, tuple(ref.shape[2:]))
    audio_latents = batch.get("audio_latents")
    with_audio = audio_latents is not None
    if with_audio:
        a0 = pack_audio(audio_latents.float())
        shift = scheduler_shift(a0.shape[1]) if cfg.training.timestep_shift else 0.0
        a_sigma = sample_sigmas(b, shift, generator)
        a_noise = torch.randn(a0.shape, generator=generator, device=generator.device, dtype=a0.dtype)
        a_tokens, a_target = noisy(a0, a_noise, a_sigma[:, None, None]), velocity(a0, a_noise)
    else:
        a_sigma = inputs.sigmas
        a_tokens = torch.zeros(b, 1, AUDIO_LATENT_CHANNELS * AUDIO_LATENT_MEL, device=x0.device)
    v_pred, a_pred = forward_av(transformer, inputs.tokens, inputs.timestep, a_tokens, a_sigma * 1000.0, batch,
                                (f, h, w), (inputs.sigmas, a_sigma), with_audio, coords)  # fmt: skip
    video_loss = flow_matching_loss(strategy.prediction_for_loss(v_pred, inputs), inputs.target, inputs.loss_mask)
    if not with_audio:  # the same keys every step: processes reduce the parts together (nan = not in this batch)
        return {"loss": video_loss, "loss_video": video_loss, "loss_audio": torch.full_like(video_loss, math.nan)}
    audio_loss = flow_matching_loss(a_pred, a_target)
    return {"loss": video_loss + audio_loss, "loss_video": video_loss, "loss_audio": audio_loss}


# --------------------------------------------------------------------------------------------------
# Validation: diffusers' LTX2Pipeline / LTX2ImageToVideoPipeline with the transformer being trained

# diffusers' LTX2 pipelines' defaults are Lightricks' recommended dev settings (CFG 3 video / 7 audio, STG 1 on
# block 28, modality guidance 3, rescale 0.7); 30 steps. Distilled checkpoints: 8 fixed noise levels, no guidance.
DISTILLED_SIGMAS = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875)
_GUIDED = {"guidance_scale": 3.0, "audio_guidance_scale": 7.0, "stg_scale": 1.0, "modality_scale": 3.0}
_UNGUIDED = {"guidance_scale": 1.0, "audio_guidance_scale": 1.0, "stg_scale": 0.0, "modality_scale": 1.0}
INFERENCE = {
    "dev": {"schedule": "shifted", "inference_steps": 30, **_GUIDED},
    "distilled": {"schedule": list(DISTILLED_SIGMAS), "inference_steps": 8, **_UNGUIDED},
}
INFERENCE_COMMON = {
    "frame_rate": 24.0,
    "decode_timestep": 0.0,
    "decode_noise_scale": 0.0,
    "image_cond_noise_scale": 0.0,
}
STG_BLOCK = 28
_AUDIO_PARTS: dict = {}


def inference_kind(model_cfg) -> str:
    src = model_cfg.source
    name = (src.version or "") if src.kind == "named" else (src.path.name if src.path is not None else "")
    return "distilled" if "distilled" in name.lower() else "dev"


def inference_settings(model_cfg) -> dict:
    kind = inference_kind(model_cfg)
    return {"kind": kind, **INFERENCE[kind], **INFERENCE_COMMON}


def validation_sigmas(model_cfg, schedule, steps: int, seq_len: int) -> list[float]:
    """A given list as is, or "shifted": `steps` evenly spaced levels shifted for `seq_len` video tokens and
    stretched to the scheduler's terminal, as LTX2Pipeline computes them."""
    if schedule != "shifted":
        return [float(s) for s in schedule]
    import numpy as np

    scheduler = load_scheduler(model_cfg)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=scheduler_shift(seq_len))
    return scheduler.sigmas[:-1].tolist()


def _audio_parts(model_cfg, dtype, device):
    key = (model_cfg.model_dump_json(), str(dtype))
    if key not in _AUDIO_PARTS:
        _AUDIO_PARTS[key] = (load_audio_vae(model_cfg, dtype=dtype).eval(), load_vocoder(model_cfg, dtype=dtype).eval())
    audio_vae, vocoder = _AUDIO_PARTS[key]
    return audio_vae.to(device), vocoder.to(device)


def validation_pipeline(model_cfg, transformer, vae, tokenizer, text_encoder):
    """LTX2Pipeline around the transformer being trained (LTX2ImageToVideoPipeline shares its parts: see
    `render_validation`); its scheduler samples exactly the given noise levels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

    device, dtype = vae.device, vae.dtype
    audio_vae, vocoder = _audio_parts(model_cfg, dtype, device)
    pipe = LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0), vae=vae,
        audio_vae=audio_vae, text_encoder=text_encoder.gemma, tokenizer=tokenizer,
        connectors=text_encoder.connectors, transformer=transformer, vocoder=vocoder,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validation_texts(cfg, s: dict, tokenizer, text_encoder, prompt: str, device) -> dict:
    """The pipeline encodes prompts itself (Gemma + connectors, as at inference)."""
    negative = cfg.validation.negative_prompt if s["guidance_scale"] > 1.0 else None
    return {"prompt": prompt, "negative": negative}


def render_ic_validation(pipe, cfg, s: dict, texts: dict, reference: torch.Tensor, generator):
    """An IC-LoRA validation video: diffusers' LTX2InContextPipeline on the validation pipeline's parts, the reference
    (uint8 [F, H/n, W/n, 3], already read at the size training encodes references) as its reference condition with
    `reference_downscale_factor` n. Returns what `render_validation` returns."""
    from diffusers import LTX2InContextPipeline
    from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition
    from PIL import Image

    parts = ("scheduler", "vae", "audio_vae", "text_encoder", "tokenizer", "connectors", "transformer", "vocoder")
    ic = LTX2InContextPipeline(**{name: pipe.components[name] for name in parts})
    ic.set_progress_bar_config(disable=True)
    condition = LTX2ReferenceCondition(frames=[Image.fromarray(frame) for frame in reference.numpy()])
    extra = {"reference_conditions": [condition], "reference_downscale_factor": cfg.dataset.reference_downscale}
    return render_validation(ic, cfg, s, texts, None, generator, **extra)


def render_validation(pipe, cfg, s: dict, texts: dict, image, generator, **extra):
    """(video [F, H, W, 3] floats in [0, 1], audio [channels, samples] in [-1, 1], audio sample rate). `extra`: more
    arguments of the pipeline (IC-LoRA's reference)."""
    import numpy as np
    from diffusers import LTX2ImageToVideoPipeline

    width, height, frames = cfg.validation.video_dims
    kwargs = {}
    if image is not None:
        pipe = LTX2ImageToVideoPipeline(**pipe.components)
        pipe.set_progress_bar_config(disable=True)
        kwargs["image"] = image
    blocks = len(_unwrap(pipe.transformer).transformer_blocks)
    guided = {k: s[k] for k in ("guidance_scale", "audio_guidance_scale", "stg_scale", "modality_scale")}
    out = pipe(
        prompt=texts["prompt"], negative_prompt=texts["negative"], width=width, height=height, num_frames=frames,
        frame_rate=s["frame_rate"], sigmas=list(s["sigmas"]), num_inference_steps=len(s["sigmas"]),
        audio_stg_scale=s["stg_scale"], spatio_temporal_guidance_blocks=[min(STG_BLOCK, blocks - 1)],
        decode_timestep=s["decode_timestep"], decode_noise_scale=s["decode_noise_scale"],
        max_sequence_length=s["max_text_length"], generator=generator, output_type="np", **guided, **kwargs, **extra,
    )  # fmt: skip
    video = np.asarray(out.frames[0], dtype=np.float32)
    audio = out.audio[0].float().cpu().clamp(-1, 1)
    return video, audio, int(pipe.vocoder.config.output_sampling_rate)

"""IC-LoRA validation videos: the LoRA being trained, steered by a reference video, sampled the way it trains.

The reference clip (validation.reference_videos[i], resized and cropped like training clips to validation.video_dims
divided by dataset.reference_downscale) is encoded and given to the model as clean tokens at timestep 0 - exactly
the training layout:
- LTX-2: diffusers' LTX2InContextPipeline (the family's `render_ic_validation`), which appends the reference tokens
  with the positions training gives them and generates the audio track too;
- LTXV 0.9.x: this module's sampler - the target tokens denoised by the family's flow-match scheduler (same sigmas
  and shift as LTXPipeline) with classifier-free guidance. diffusers' LTXConditionPipeline is not used: for a
  condition video at frame 0 it overwrites the first target frames with the reference instead of prepending it,
  which is not what an IC-LoRA learned.
Writes <index>_<n>_<prompt words>.mp4 and a side-by-side <...>_side_by_side.mp4 (reference | result; a downscaled
reference is shown enlarged by pixel repetition, as the model saw it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoints import validation_dir
from .config import Config
from .data import reference_bucket
from .errors import UserError
from .models import family
from .video import VideoError, frames_to_vae_input, read_clip


def reference_dims(cfg: Config) -> list[int]:
    """[width, height, frames] the validation references are read at: validation.video_dims / reference_downscale."""
    return reference_bucket(cfg.validation.video_dims, cfg.dataset.reference_downscale, "validation.video_dims")


def read_reference(path: str, dims: list[int], index: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] of the reference, resized to cover `dims` (`reference_dims`) and centre-cropped."""
    width, height, frames = dims
    if not Path(path).expanduser().is_file():
        raise UserError(f"validation.reference_videos[{index}]: {path} does not exist (give one video per prompt)")
    try:
        return read_clip(Path(path).expanduser(), width, height, frames)[0]
    except (VideoError, OSError) as e:
        raise UserError(
            f"validation.reference_videos[{index}]: cannot use {path} ({e}); give a video of at least {frames} frames"
        ) from None


def _encode_prompts(cfg: Config, s: dict, tokenizer, text_encoder, prompt: str, device):
    """(embeds, mask) of [negative prompt, prompt], encoded as the training captions are."""
    texts = [cfg.validation.negative_prompt, prompt]
    embeds, mask = family(cfg.model).encode_captions(
        tokenizer, text_encoder, texts, s["max_text_length"], device, s["caption_encoding"]
    )
    return embeds, mask.to(device)


@torch.no_grad()
def sample(cfg: Config, s: dict, transformer, vae, embeds, mask, reference: torch.Tensor, generator):
    """Denoise one video at the settings' noise levels with the reference's clean tokens prepended; returns uint8
    frames [F, H, W, 3]."""
    fam = family(cfg.model)
    device, dtype = embeds.device, next(vae.parameters()).dtype
    ref_latents = fam.encode_video(vae, frames_to_vae_input(reference)[None].to(device, dtype)).float()
    c, f, h, w = ref_latents.shape[1:]
    latents = torch.randn((1, c, f, h, w), generator=generator, device=device)
    x, ref = fam.pack_latents(latents), fam.pack_latents(ref_latents)
    n_ref, seq = ref.shape[1], x.shape[1]
    scheduler = fam.load_scheduler(cfg.model)
    scheduler.set_timesteps(
        sigmas=np.asarray(s["sigmas"], dtype=np.float64), mu=fam.scheduler_shift(seq), device=device
    )
    guided = s["guidance_scale"] > 1.0
    rows = 2 if guided else 1
    batch = {
        "prompt_embeds": embeds if guided else embeds[1:],
        "prompt_attention_mask": mask if guided else mask[1:],
        "fps": torch.full((rows,), float(s["frame_rate"])),
    }
    for t in scheduler.timesteps:
        tokens = torch.cat([ref, x], dim=1).expand(rows, -1, -1)
        timestep = torch.cat([torch.zeros(n_ref, device=device), t.expand(seq).float()])[None].expand(rows, -1)
        pred = fam.forward(transformer, tokens, timestep, batch, (f, h, w), reference_grid=(f, h, w))[:, n_ref:]
        pred = pred.float()
        if guided:
            pred = pred[:1] + s["guidance_scale"] * (pred[1:] - pred[:1])
        x = scheduler.step(pred, t, x, return_dict=False)[0]
    out = x.transpose(1, 2).reshape(1, c, f, h, w)
    return fam.decode_latents(vae, out.to(dtype))


def _generator(cfg: Config, s: dict, transformer, parts, prompt: str, reference: torch.Tensor, device):
    """generator -> (uint8 video [F, H, W, 3], audio or None, audio sample rate or None), with the family's IC-LoRA
    pipeline where it has one, else this module's sampler."""
    fam = family(cfg.model)
    vae, tokenizer, text_encoder = parts
    if fam.render_ic_validation is not None:
        pipe = fam.validation_pipeline(cfg.model, transformer, vae, tokenizer, text_encoder)
        texts = fam.validation_texts(cfg, s, tokenizer, text_encoder, prompt, device)

        def generate(generator):
            video, audio, rate = fam.render_ic_validation(pipe, cfg, s, texts, reference, generator)
            return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8), audio, rate

        return generate
    embeds, mask = _encode_prompts(cfg, s, tokenizer, text_encoder, prompt, device)
    return lambda generator: (sample(cfg, s, transformer, vae, embeds, mask, reference, generator).numpy(), None, None)


def render(cfg: Config, s: dict, transformer, parts, run_dir, step: int, index: int, prompt: str, slug, write_mp4):
    """The videos of one prompt with its reference: yields (result mp4, seed); a side-by-side mp4 (reference |
    result) is written beside each."""
    v = cfg.validation
    device = next(transformer.parameters()).device
    out_dir = validation_dir(run_dir, step)
    reference = read_reference(v.reference_videos[index], reference_dims(cfg), index)
    generate = _generator(cfg, s, transformer, parts, prompt, reference, device)
    n = cfg.dataset.reference_downscale
    shown = reference.repeat_interleave(n, dim=1).repeat_interleave(n, dim=2).numpy()  # at the result's size
    for j in range(v.videos_per_prompt):
        seed = v.seed + 1000 * index + j
        frames, audio, rate = generate(torch.Generator(device).manual_seed(seed))
        name = f"{index:02d}_{j:02d}_{slug(prompt)}"
        path = write_mp4(frames, out_dir / f"{name}.mp4", s["frame_rate"], audio, rate)
        side = np.concatenate([shown[: frames.shape[0]], frames], axis=2)  # [F, H, 2W, 3]
        write_mp4(side, out_dir / f"{name}_side_by_side.mp4", s["frame_rate"], audio, rate)
        yield path, seed

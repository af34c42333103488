"""IC-LoRA validation videos: the LoRA being trained, steered by a reference video, sampled the way it trains.

The reference clip (validation.reference_videos[i], resized and cropped to validation.video_dims like training
clips) is encoded and prepended as clean tokens at timestep 0 - exactly the training layout - while the target
tokens are denoised by the family's flow-match scheduler (same sigmas and shift as LTXPipeline) with
classifier-free guidance. diffusers' LTXConditionPipeline is not used: for a condition video at frame 0 it
overwrites the first target frames with the reference instead of prepending it, which is not what an IC-LoRA
learned. Writes <index>_<n>_<prompt words>.mp4 and a side-by-side <...>_side_by_side.mp4 (reference | result).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoints import validation_dir
from .config import Config
from .errors import UserError
from .models import family
from .video import VideoError, frames_to_vae_input, read_clip


def read_reference(path: str, dims: list[int], index: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] of the reference, resized to cover the validation size and centre-cropped."""
    width, height, frames = dims
    if not Path(path).expanduser().is_file():
        raise UserError(f"validation.reference_videos[{index}]: {path} does not exist (give one video per prompt)")
    try:
        return read_clip(Path(path).expanduser(), width, height, frames)[0]
    except (VideoError, OSError) as e:
        raise UserError(
            f"validation.reference_videos[{index}]: cannot use {path} ({e}); give a video of at least {frames} frames"
        ) from None


def _encode_prompts(cfg: Config, tokenizer, text_encoder, prompt: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    fam = family(cfg.model)
    texts = [cfg.validation.negative_prompt, prompt]
    embeds, mask = fam.encode_captions(
        tokenizer, text_encoder, texts, cfg.dataset.preprocessing.max_text_length, device
    )
    return embeds, mask.to(device)


@torch.no_grad()
def sample(cfg: Config, transformer, vae, embeds, mask, reference: torch.Tensor, generator, fps: float):
    """Denoise one video with the reference's clean tokens prepended; returns uint8 frames [F, H, W, 3]."""
    fam, v = family(cfg.model), cfg.validation
    device, dtype = embeds.device, next(vae.parameters()).dtype
    ref_latents = fam.encode_video(vae, frames_to_vae_input(reference)[None].to(device, dtype)).float()
    c, f, h, w = ref_latents.shape[1:]
    latents = torch.randn((1, c, f, h, w), generator=generator, device=device)
    x, ref = fam.pack_latents(latents), fam.pack_latents(ref_latents)
    n_ref, seq = ref.shape[1], x.shape[1]
    scheduler = fam.load_scheduler(cfg.model)
    steps = max(2, v.inference_steps)  # the LTXV scheduler (shift_terminal) divides by zero with one step
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=fam.scheduler_shift(seq), device=device)
    guided = v.guidance_scale > 1.0
    rows = 2 if guided else 1
    batch = {
        "prompt_embeds": embeds if guided else embeds[1:],
        "prompt_attention_mask": mask if guided else mask[1:],
        "fps": torch.full((rows,), float(fps)),
    }
    for t in scheduler.timesteps:
        tokens = torch.cat([ref, x], dim=1).expand(rows, -1, -1)
        timestep = torch.cat([torch.zeros(n_ref, device=device), t.expand(seq).float()])[None].expand(rows, -1)
        pred = fam.forward(transformer, tokens, timestep, batch, (f, h, w), reference_grid=(f, h, w))[:, n_ref:]
        pred = pred.float()
        if guided:
            pred = pred[:1] + v.guidance_scale * (pred[1:] - pred[:1])
        x = scheduler.step(pred, t, x, return_dict=False)[0]
    out = x.transpose(1, 2).reshape(1, c, f, h, w)
    return fam.decode_latents(vae, out.to(dtype))


def render(cfg: Config, transformer, parts, run_dir, step: int, prompts, slug, write_mp4, fps: int) -> list:
    """Every prompt with its reference video; returns the result mp4 paths (side-by-side files beside them)."""
    v = cfg.validation
    vae, tokenizer, text_encoder = parts
    device = next(transformer.parameters()).device
    out_dir = validation_dir(run_dir, step)
    written = []
    for i, prompt in enumerate(prompts):
        reference = read_reference(v.reference_videos[i], v.video_dims, i)
        embeds, mask = _encode_prompts(cfg, tokenizer, text_encoder, prompt, device)
        for j in range(v.videos_per_prompt):
            generator = torch.Generator(device).manual_seed(v.seed + 1000 * i + j)
            frames = sample(cfg, transformer, vae, embeds, mask, reference, generator, fps)
            name = f"{i:02d}_{j:02d}_{slug(prompt)}"
            written.append(write_mp4(frames.numpy(), out_dir / f"{name}.mp4", fps))
            side = torch.cat([reference[: frames.shape[0]], frames], dim=2)  # [F, H, 2W, 3]
            write_mp4(side.numpy(), out_dir / f"{name}_side_by_side.mp4", fps)
    return written

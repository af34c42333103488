"""Validation videos during training: the weights being trained, rendered with diffusers' LTX pipelines.

Runs on the main process only. The VAE, text encoder and scheduler are loaded once per process and kept
(on the CPU between validations). Writes
<run_dir>/validation/step_NNNNNN/<index>_<prompt words>.mp4 with PyAV.
"""

from __future__ import annotations

import contextlib
import logging
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .checkpoints import validation_dir
from .config import Config
from .errors import UserError
from .models import family

log = logging.getLogger("ltxv_tuner.validation")

VALIDATION_FPS = 24
_PARTS: dict[str, tuple] = {}  # model config JSON -> (vae, tokenizer, text_encoder)


def _slug(text: str, words: int = 6) -> str:
    return "_".join(re.findall(r"[A-Za-z0-9]+", text.lower())[:words]) or "prompt"


def final_prompts(cfg: Config) -> list[str]:
    """The prompts as trained captions look: id_token first, as preprocessing prepends it."""
    token = cfg.dataset.id_token
    return [f"{token} {p}" if token and not p.startswith(token) else p for p in cfg.validation.prompts]


def load_images(cfg: Config) -> list:
    """One first-frame image per prompt, None where the prompt is text-only (no `validation.images`: all)."""
    if cfg.validation.images is None:
        return [None] * len(cfg.validation.prompts)
    from PIL import Image

    images = []
    for i, path in enumerate(cfg.validation.images):
        if path is None:
            images.append(None)
            continue
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as e:
            raise UserError(f"validation.images[{i}]: cannot read {path} ({e}); give a PNG or JPEG file") from None
    return images


def _parts(cfg: Config, dtype: torch.dtype):
    fam = family(cfg.model)
    key = f"{cfg.model.model_dump_json()}|{dtype}"
    if key not in _PARTS:
        vae = fam.load_vae(cfg.model, dtype=dtype)
        tokenizer, text_encoder = fam.load_text_encoder(cfg.model, dtype=dtype)
        _PARTS[key] = (vae.eval(), tokenizer, text_encoder.eval())
    return _PARTS[key]


def write_mp4(frames: np.ndarray, path: Path, fps: int = VALIDATION_FPS) -> Path:
    """frames: [F, H, W, 3] floats in [0, 1] or uint8; H and W even (LTXV sizes are multiples of 32)."""
    import av

    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    tmp.replace(path)
    return path


def run_validation(cfg: Config, transformer: torch.nn.Module, run_dir: Path, step: int) -> list[Path]:
    """Render every validation prompt with `transformer` as it is now; returns the mp4 paths."""
    v = cfg.validation
    if not v.prompts:
        return []
    device = next(transformer.parameters()).device
    mixed = cfg.training.mixed_precision_mode
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed) if device.type == "cuda" else None
    parts_dtype = torch.float32 if device.type == "cpu" else (autocast_dtype or torch.float32)
    vae, tokenizer, text_encoder = _parts(cfg, parts_dtype)
    vae.to(device)
    text_encoder.to(device)
    images = load_images(cfg)
    # Text-to-video and image-to-video pipelines share every component; each is built only when a prompt needs it.
    pipes = {
        i2v: family(cfg.model).validation_pipeline(
            cfg.model, transformer, vae, tokenizer, text_encoder, image_to_video=i2v
        )
        for i2v in {image is not None for image in images}
    }
    width, height, frames = v.video_dims
    steps = v.inference_steps
    if steps < 2:  # LTXV's scheduler (shift_terminal) divides by zero with a single step
        log.warning("validation.inference_steps: %d is too few for the LTXV scheduler; using 2", steps)
        steps = 2
    out_dir = validation_dir(run_dir, step)
    was_training = transformer.training
    transformer.eval()
    written = []
    try:
        autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            for i, prompt in enumerate(final_prompts(cfg)):
                # One video per call: less memory, and diffusers' image-to-video decode breaks for batches > 1.
                for j in range(v.videos_per_prompt):
                    generator = torch.Generator(device).manual_seed(v.seed + 1000 * i + j)
                    kwargs = {"image": images[i]} if images[i] is not None else {}
                    video = pipes[images[i] is not None](
                        prompt=prompt,
                        negative_prompt=v.negative_prompt,
                        width=width,
                        height=height,
                        num_frames=frames,
                        frame_rate=VALIDATION_FPS,
                        num_inference_steps=steps,
                        guidance_scale=v.guidance_scale,
                        generator=generator,
                        output_type="np",
                        max_sequence_length=cfg.dataset.preprocessing.max_text_length,
                        **kwargs,
                    ).frames
                    name = f"{i:02d}_{j:02d}_{_slug(prompt)}.mp4"
                    written.append(write_mp4(np.asarray(video[0], dtype=np.float32), out_dir / name))
    finally:
        transformer.train(was_training)
        # Training never needs the VAE or T5: they leave the GPU as soon as the videos are made.
        vae.to("cpu")
        text_encoder.to("cpu")
    log.info("validation step %d: %d video(s) in %s", step, len(written), out_dir)
    return written

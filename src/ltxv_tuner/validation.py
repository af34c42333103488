"""Validation videos during training: the weights being trained, rendered as Lightricks recommends for the model.

Every video goes through diffusers' LTXConditionPipeline (image-to-video for each prompt with an image in
`validation.images`, text-to-video for the others: no list, or null in it) with the settings of the model version
(`family.inference_settings`: dev or distilled schedule, guidance, decode timestep and noise, frame rate), each
overridable in `validation.*`. Prompts are encoded by the family's `encode_captions` with the training cache's
caption_encoding, so the model sees prompts as it saw captions.

Runs on the main process only. The VAE, text encoder and scheduler are loaded once per process and kept
(on the CPU between validations). Writes
<run_dir>/validation/step_NNNNNN/<index>_<prompt words>.mp4 with PyAV, and beside each a .txt sidecar (YAML) with
the prompt and every setting it was rendered with.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
from pathlib import Path

import numpy as np
import torch
import yaml

from .checkpoints import validation_dir
from .config import Config
from .errors import UserError
from .models import family

log = logging.getLogger("ltxv_tuner.validation")

_PARTS: dict[str, tuple] = {}  # model config JSON -> (vae, tokenizer, text_encoder)
_OVERRIDABLE = ("inference_steps", "guidance_scale", "decode_timestep", "decode_noise_scale", "frame_rate",
                "image_cond_noise_scale")  # fmt: skip


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


def render_settings(cfg: Config) -> dict:
    """The settings validation renders with: the model version's (Lightricks' recommendation), then every
    `validation.*` value that is set. `sigmas` are the noise levels actually sampled at."""
    v = cfg.validation
    fam = family(cfg.model)
    s = fam.inference_settings(cfg.model)
    for key in _OVERRIDABLE:
        if getattr(v, key) is not None:
            s[key] = getattr(v, key)
    if v.schedule is not None:
        s["schedule"] = v.schedule
    if s["schedule"] != "shifted" and v.inference_steps is not None:
        log.warning("validation.inference_steps: ignored, the schedule is a fixed list of %d noise levels (set "
                    "validation.schedule: shifted to use it)", len(s["schedule"]))  # fmt: skip
    if s["schedule"] == "shifted" and s["inference_steps"] < 2:  # the terminal stretch divides by zero with 1
        log.warning("validation.inference_steps: %d is too few for the LTXV scheduler; using 2", s["inference_steps"])
        s["inference_steps"] = 2
    seq_len = fam.sequence_length(*v.video_dims)
    s["sigmas"] = fam.validation_sigmas(cfg.model, s["schedule"], s["inference_steps"], seq_len)
    s["inference_steps"] = len(s["sigmas"])
    s["caption_encoding"] = cfg.dataset.preprocessing.caption_encoding
    s["max_text_length"] = cfg.dataset.preprocessing.max_text_length
    return s


def _parts(cfg: Config, dtype: torch.dtype):
    fam = family(cfg.model)
    key = f"{cfg.model.model_dump_json()}|{dtype}"
    if key not in _PARTS:
        vae = fam.load_vae(cfg.model, dtype=dtype)
        tokenizer, text_encoder = fam.load_text_encoder(cfg.model, dtype=dtype)
        _PARTS[key] = (vae.eval(), tokenizer, text_encoder.eval())
    return _PARTS[key]


def write_mp4(frames: np.ndarray, path: Path, fps: float = 25, audio=None, sample_rate: int | None = None) -> Path:
    """frames: [F, H, W, 3] floats in [0, 1] or uint8; H and W even (LTX sizes are multiples of 32). `audio`:
    [channels, samples] in [-1, 1] at `sample_rate`, muxed in as an AAC track (LTX-2)."""
    from .video import write_video

    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    if audio is None:
        write_video(tmp, frames, fps)
    else:
        write_video(tmp, frames, fps, audio=torch.as_tensor(audio), sample_rate=sample_rate)
    tmp.replace(path)
    return path


def _render_ic_lora(cfg: Config, transformer, parts, run_dir: Path, step: int, autocast_dtype) -> list[Path]:
    from . import ic_validation

    device = next(transformer.parameters()).device
    s = render_settings(cfg)
    was_training = transformer.training
    transformer.eval()
    written = []
    try:
        autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with autocast:
            for i, prompt in enumerate(final_prompts(cfg)):
                videos = ic_validation.render(cfg, s, transformer, parts, run_dir, step, i, prompt, _slug, write_mp4)
                for path, seed in videos:
                    record = {**_record(cfg, s, step, prompt, i, seed), "mode": "ic-lora",
                              "reference_video": cfg.validation.reference_videos[i],
                              "reference_downscale": cfg.dataset.reference_downscale,
                              "pipeline": family(cfg.model).IC_VALIDATION_PIPELINE}  # fmt: skip
                    write_sidecar(path, record)
                    written.append(path)
    finally:
        transformer.train(was_training)
        parts[0].to("cpu")
        parts[2].to("cpu")
    out_dir = validation_dir(run_dir, step)
    log.info("validation step %d: %d video(s) (+ side-by-side) in %s", step, len(written), out_dir)
    return written


def write_sidecar(mp4: Path, record: dict) -> Path:
    """<video>.txt beside the mp4: the prompt and every setting it was rendered with (YAML, one key per line)."""
    path = mp4.with_suffix(".txt")
    text = yaml.safe_dump(record, sort_keys=False, allow_unicode=True, width=1000, default_flow_style=None)
    path.write_text(text, encoding="utf-8")
    return path


def _record(cfg: Config, s: dict, step: int, prompt: str, index: int, seed: int) -> dict:
    v = cfg.validation
    width, height, frames = v.video_dims
    image = v.images[index] if v.images is not None else None
    return {
        "step": step, "prompt": prompt,
        "negative_prompt": v.negative_prompt if s["guidance_scale"] > 1.0 else None,
        "image": image, "mode": "image-to-video" if image else "text-to-video",
        "pipeline": family(cfg.model).VALIDATION_PIPELINE, "model_source": cfg.model.model_source,
        "inference": s["kind"], "width": width, "height": height, "frames": frames, "seed": seed,
        **{k: s[k] for k in ("frame_rate", "inference_steps", "sigmas", "guidance_scale", "decode_timestep",
                             "decode_noise_scale", "image_cond_noise_scale", "caption_encoding", "max_text_length")},
        **{k: s[k] for k in ("audio_guidance_scale", "stg_scale", "modality_scale") if k in s},  # LTX-2
    }  # fmt: skip


@contextlib.contextmanager
def own_random_state(device: torch.device):
    """Whatever validation draws (model loading seeds, the pipeline, the scheduler) leaves the global random
    states of torch (CPU and this GPU), numpy and `random` as they were: the training stream (dropout, ...) is
    the same with or without validation, and a resume from a validation step stays exact."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


def run_validation(cfg: Config, transformer: torch.nn.Module, run_dir: Path, step: int) -> list[Path]:
    """Render every validation prompt with `transformer` as it is now, with its own seeded generators and without
    touching the global random states; returns the mp4 paths."""
    if not cfg.validation.prompts:
        return []
    device = next(transformer.parameters()).device
    with own_random_state(device):
        return _render_all(cfg, transformer, run_dir, step, device)


def _render_all(
    cfg: Config, transformer: torch.nn.Module, run_dir: Path, step: int, device: torch.device
) -> list[Path]:
    v = cfg.validation
    mixed = cfg.training.mixed_precision_mode
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed) if device.type == "cuda" else None
    parts_dtype = torch.float32 if device.type == "cpu" else (autocast_dtype or torch.float32)
    vae, tokenizer, text_encoder = _parts(cfg, parts_dtype)
    vae.to(device)
    text_encoder.to(device)
    if cfg.training.strategy == "ic_lora":
        return _render_ic_lora(cfg, transformer, (vae, tokenizer, text_encoder), run_dir, step, autocast_dtype)
    images = load_images(cfg)
    s = render_settings(cfg)
    fam = family(cfg.model)
    pipe = fam.validation_pipeline(cfg.model, transformer, vae, tokenizer, text_encoder)
    out_dir = validation_dir(run_dir, step)
    was_training = transformer.training
    transformer.eval()
    written = []
    try:
        autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            for i, prompt in enumerate(final_prompts(cfg)):
                texts = fam.validation_texts(cfg, s, tokenizer, text_encoder, prompt, device)
                # One video per call: less memory, and one seed per video.
                for j in range(v.videos_per_prompt):
                    seed = v.seed + 1000 * i + j
                    generator = torch.Generator(device).manual_seed(seed)
                    # images[i] None: text-to-video. audio: the generated track (LTX-2), None for LTXV
                    video, audio, rate = fam.render_validation(pipe, cfg, s, texts, images[i], generator)
                    path = out_dir / f"{i:02d}_{j:02d}_{_slug(prompt)}.mp4"
                    write_mp4(video, path, s["frame_rate"], audio, rate)
                    write_sidecar(path, _record(cfg, s, step, prompt, i, seed))
                    written.append(path)
    finally:
        transformer.train(was_training)
        # Training never needs the VAE or T5: they leave the GPU as soon as the videos are made.
        vae.to("cpu")
        text_encoder.to("cpu")
    log.info("validation step %d: %d video(s) in %s", step, len(written), out_dir)
    return written

"""The typed schema of the unified YAML: load, apply dotted overrides, validate, report every problem at once.

Every field carries its default and description here; the config reference (docs/CONFIG.md) is generated from
these descriptions (`python -m ltxv_tuner.config --markdown`), so the two cannot drift apart.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import ConfigError

MIXED_PRECISION = Literal["no", "fp16", "bf16"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def shown(value: Any, limit: int = 80) -> str:
    """A value as messages show it: bounded in depth, items and length, however large the value (a YAML alias
    bomb expands to millions of items that share memory; rendering them whole would take minutes)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxstring, r.maxother = 3, 6, 6, 6, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def non_empty_path(v: str, example: str) -> str:
    if not v.strip():
        raise ValueError(f"is empty, which would mean the folder you run in; give a folder, e.g. {example}")
    return v


def check_video_dims(width: int, height: int, frames: int) -> list[str]:
    """Problems with a [width, height, frames] triple for the LTXV VAE (32x spatial, 8x temporal)."""
    problems = []
    for name, value in (("width", width), ("height", height)):
        if value < 32 or value % 32:
            lo = max(32, value // 32 * 32)
            problems.append(f"{name} must be a positive multiple of 32, got {value} (use {lo} or {lo + 32})")
    if frames < 1 or (frames - 1) % 8:
        lo = max(1, (frames - 1) // 8 * 8 + 1)
        problems.append(f"frames must be 8n+1 (1, 9, 17, 25, ...), got {frames} (use {lo} or {lo + 8})")
    return problems


class PreprocessingConfig(_Section):
    batch_size: int = Field(1, ge=1, description="Clips encoded by the VAE at once (same bucket only).")
    num_workers: int | None = Field(
        None,
        ge=0,
        description="Background threads decoding, resizing and converting videos while the VAE encodes on a GPU (0 = "
        "decode inline; null = automatic: half the CPU cores, 1 to 4), and on the CPU for clips above 256x192x33. "
        "Smaller clips on the CPU are encoded in one lane per torch thread instead, the lanes decoding a round of "
        "clips side by side and then encoding them. The cache is bit-identical whatever the count.",
    )
    vae_tiling: bool = Field(False, description="Tiled VAE encoding: lower memory for large frames, slightly slower.")
    vae_posterior: Literal["sample", "mode"] = Field(
        "sample",
        description="Latents from the VAE posterior: `sample` draws one, as LTX-Video-Trainer and Lightricks' own "
        "encoder do (seeded by the clip's cache key: encoding again gives the same latents); `mode` takes its mean. "
        "Part of the latent cache key: switching re-encodes the latents only.",
    )
    decode_videos: bool = Field(
        False,
        description="Decode the cached latents back to mp4 under .precomputed/decoded/ to check what the model sees.",
    )
    max_text_length: int = Field(
        128,
        ge=8,
        le=1024,
        description="T5 token length of the cached caption embeddings (longer captions are cut). 128 is diffusers' "
        "LTX pipeline default; with caption_encoding: diffusers the padding length changes the features, so keep it "
        "equal to the max_sequence_length of the inference you run. LTX-2 (Gemma): 1024 unless set, as its "
        "pipelines pad prompts.",
    )
    caption_encoding: Literal["diffusers", "comfyui"] = Field(
        "diffusers",
        description="How T5 encodes captions, to match the inference the LoRA will be used with: `diffusers` = exactly "
        "LTXPipeline.encode_prompt (and LTX-Video-Trainer): T5 runs without the attention mask, so the padding "
        "shifts the real tokens' features a little; `comfyui` = as ComfyUI's LTXV text encoder and Lightricks' "
        "LTX-Video inference: T5 runs with the mask (features independent of padding). Validation videos use the same "
        "encoding. Part of the caption cache key: switching re-encodes captions only.",
    )
    frame_sampling: Literal["start", "center"] = Field(
        "start", description="Where the bucket's frames are taken from in a longer clip: its start or its middle."
    )
    prune: bool = Field(
        False, description="Delete cache files no clip of this config refers to (other configs may share them)."
    )


class DatasetConfig(_Section):
    data_folder: str = Field(..., description="Folder of clip.mp4 + clip.txt pairs; the cache lives in .precomputed/.")

    @field_validator("data_folder")
    @classmethod
    def _folder_given(cls, v: str) -> str:
        return non_empty_path(v, "data/videos")

    resolution_buckets: list[list[int]] = Field(
        default_factory=lambda: [[768, 768, 97]],
        description="[width, height, frames] shapes; each clip goes to the best-fitting one. "
        "Width/height multiples of 32, frames 8n+1.",
    )
    id_token: str | None = Field(None, description="Trigger word prepended to every caption (e.g. SQUISH).")
    strict: bool = Field(False, description="Stop on any skipped clip or caption problem instead of reporting it.")
    reference_folder: str | None = Field(
        None,
        description="IC-LoRA (training.strategy: ic_lora): a folder mirroring data_folder with one reference (control) "
        "video per clip - the reference of <data_folder>/sub/a.mp4 is <reference_folder>/sub/a.<any video ext>.",
    )
    reference_downscale: int = Field(
        1,
        ge=1,
        description="IC-LoRA, LTX-2 models: encode each reference at 1/n of its clip's bucket ([width/n, height/n, "
        "frames]; both must stay multiples of 32): n^2 times fewer reference tokens, as Lightricks' ltx-trainer "
        "allows. The LoRA's metadata `reference_downscale_factor` records n (ComfyUI-LTXVideo's IC-LoRA loader and "
        "ltx-pipelines read it; give it to diffusers' LTX2InContextPipeline as reference_downscale_factor). "
        "LTX-Video 0.9.x: only 1.",
    )
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)

    @field_validator("resolution_buckets", mode="before")
    @classmethod
    def _flat_bucket(cls, v: Any) -> Any:
        if isinstance(v, list) and v and all(isinstance(x, int) for x in v):
            raise ValueError(
                f"expected a list of [width, height, frames] buckets, got the flat list {shown(v)} (write [{shown(v)}])"
            )
        return v

    @field_validator("resolution_buckets")
    @classmethod
    def _buckets(cls, buckets: list[list[int]]) -> list[list[int]]:
        if not buckets:
            raise ValueError("give at least one [width, height, frames] bucket, e.g. [[512, 512, 49]]")
        problems = []
        for i, b in enumerate(buckets):
            if len(b) != 3:
                problems.append(f"[{i}]: expected [width, height, frames], got {shown(b)}")
                continue
            problems += [f"[{i}]: {p}" for p in check_video_dims(*b)]
        if len({tuple(b) for b in buckets}) != len(buckets):
            problems.append("the same bucket is listed twice")
        if problems:
            raise ValueError("; ".join(problems))
        return buckets


class ModelConfig(_Section):
    model_source: str = Field(
        "LTXV_13B_097_DEV",
        description="A named version (LTXV_13B_098_DEV, LTXV_13B_098_DISTILLED, LTXV_2B_098_DISTILLED, "
        "LTXV_13B_097_DEV, LTXV_13B_097_DISTILLED, LTXV_2B_0.9.6_DEV, LTXV_2B_0.9.6_DISTILLED, LTXV_2B_0.9.5, "
        "LTXV_2B_0.9.1, LTXV_2B_0.9.0; LTX-2: LTX2_19B_DEV, LTX2_19B_DISTILLED, LTX23_22B_DEV, LTX23_22B_DISTILLED, "
        "LTX25_22B_DEV, LTX25_22B_DISTILLED), a local single-file .safetensors (LTXV or LTX-2 official layout), a "
        "local diffusers folder, or `tiny` / `tiny-ltx2` (small random models for tests).",
    )
    training_mode: Literal["lora", "full"] = Field("lora", description="Train a LoRA adapter or all weights.")
    text_encoder: str | None = Field(
        None,
        description="Local folder with text_encoder/ and tokenizer/ (or a T5 folder; LTX-2: a Gemma folder). "
        "Default: the T5 of the LTXV repo, or for LTX-2 Google's Gemma 3 12B (downloaded once).",
    )
    vae: str | None = Field(None, description="Local VAE (single file or folder). Default: the model's own VAE.")
    _source: tuple = PrivateAttr(default=(None, None))

    @property
    def source(self):
        """`model_source` resolved (once per value) into a typed `models.ModelSource`: kind, family, path or
        repo file. Resolving reads no weights and downloads nothing; unknown names and missing paths raise."""
        text, resolved = self._source
        if text != self.model_source:
            from .models.sources import resolve

            resolved = resolve(self.model_source)
            self._source = (self.model_source, resolved)
        return resolved


class LoraConfig(_Section):
    rank: int = Field(64, ge=1, description="LoRA rank.")
    alpha: float = Field(64, gt=0, description="LoRA alpha; the update is scaled by alpha/rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        description="Transformer modules that get a LoRA (diffusers names, e.g. ff.net.0.proj, proj_in).",
    )

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one module, e.g. [to_k, to_q, to_v, to_out.0]")
        # peft can only wrap Linear layers; these LTXV modules are norms, parameters or containers.
        not_linear = {"norm_q", "norm_k", "norm1", "norm2", "time_embed", "scale_shift_table", "attn1", "attn2", "ff"}
        bad = [m for m in v if m.split(".")[-1] in not_linear or m in ("to_out", "ff.net")]
        if bad:
            raise ValueError(
                f"{', '.join(bad)}: not a Linear layer, cannot take a LoRA (use e.g. to_q, to_k, to_v, to_out.0, "
                "ff.net.0.proj, ff.net.2, proj_in, proj_out)"
            )
        return v


class TrainingConfig(_Section):
    distributed: bool = Field(False, description="Train on every visible GPU through `accelerate launch`.")
    num_processes: int | None = Field(None, ge=1, description="Processes for distributed training (null = all GPUs).")
    accelerate_config: str | None = Field(
        None,
        description="An accelerate config file (multi-node; distributed_type FSDP goes with sharding: fsdp; "
        "DeepSpeed is refused); implies distributed.",
    )
    sharding: Literal["none", "fsdp"] = Field(
        "none",
        description="none: data parallel, every process holds the whole model. fsdp: FSDP2 (fully_shard) shards "
        "each transformer block's weights, gradients and optimizer state over the processes - a full fine-tune of a "
        "model that does not fit one GPU, or LoRA on such a base. Needs several processes (training.distributed).",
    )
    cpu_offload: bool = Field(
        False,
        description="With sharding: fsdp, keep the weight shards, gradients and optimizer state in CPU memory "
        "(FSDP2 CPUOffloadPolicy): much less GPU memory, slower steps.",
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    steps: int = Field(1500, ge=1, description="Optimizer steps to train.")
    batch_size: int = Field(1, ge=1, description="Clips per step per process (one bucket per batch).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    mixed_precision_mode: MIXED_PRECISION = Field("bf16", description="Autocast precision: no, fp16 or bf16.")

    @field_validator("mixed_precision_mode", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML 1.1 reads an unquoted `no` as false

    enable_gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~30% slower.")
    optimizer_type: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw, or adamw8bit (bitsandbytes).")
    scheduler_type: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    first_frame_conditioning_p: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of samples trained as image-to-video: the first latent frame is kept clean (timestep 0) "
        "and left out of the loss. 0.5 is what Lightricks' LTX-Video-Trainer uses in its 13B LoRA templates (its "
        "code default 0.1 dates from the 2B configs): most LTXV LoRAs are used image-to-video (ComfyUI), and half "
        "the samples still train text-to-video. Never applied to a bucket of 1 frame (one latent frame: nothing "
        "would be left to learn); other buckets keep it. 0 = text-to-video only.",
    )
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none",
        description="Also log metrics to TensorBoard (logs/ of the run; pip install tensorboard) or Weights & Biases "
        "(pip install wandb; wandb login).",
    )
    timestep_shift: bool = Field(
        True, description="Shift the sampled noise levels with sequence length, as LTXV trains."
    )
    audio: Literal["auto", "on", "off"] = Field(
        "auto",
        description="LTX-2 joint audio-video training: auto = with each clip's own audio track where it has one "
        "(clips without one train video-only, reported); on = every clip must have audio (others are skipped, "
        "reported); off = video only (no audio encoded; the audio stream is left untouched). LTX-Video 0.9.x has "
        "no audio: auto and off are the same there.",
    )
    strategy: Literal["text_to_video", "ic_lora"] = Field(
        "text_to_video",
        description="text_to_video: clips + captions (image-to-video through first_frame_conditioning_p). ic_lora: "
        "in-context control LoRA - each clip's reference video (dataset.reference_folder) is prepended as clean "
        "tokens at timestep 0, outside the loss, so the LoRA learns to follow it (depth, pose, edges, any "
        "video-to-video effect).",
    )


class CheckpointsConfig(_Section):
    interval: int | None = Field(250, ge=1, description="Save every N steps (null = only at the end).")
    keep_last_n: int = Field(-1, ge=-1, description="Checkpoints kept (-1 = all). The final one is always kept.")
    auto_convert_to_comfy: bool = Field(
        True, description="Write a ComfyUI twin <name>_comfy.safetensors after training."
    )
    save_dtype: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="Dtype of exported weight files.")


class ValidationConfig(_Section):
    """Validation videos render as Lightricks recommends for the model version (models/ltxv.py INFERENCE): every
    setting left null here comes from the version, dev or distilled (docs/TRAINING.md has the table)."""

    interval: int | None = Field(None, ge=1, description="Generate validation videos every N steps (null = off).")
    prompts: list[str] = Field(default_factory=list, description="Prompts to render (id_token is prepended).")
    negative_prompt: str = Field(
        "worst quality, inconsistent motion, blurry, jittery, distorted",
        description="Negative prompt for validation videos (used when guidance_scale > 1).",
    )
    images: list[str | None] | None = Field(
        None,
        description="First-frame images, one per prompt: image-to-video through diffusers' LTXConditionPipeline; "
        "null for a prompt that stays text-to-video, e.g. [first.png, null].",
    )
    reference_videos: list[str] | None = Field(
        None, description="IC-LoRA: one reference (control) video per prompt; a side-by-side mp4 is written too."
    )
    video_dims: list[int] = Field(
        default_factory=lambda: [256, 256, 25], description="[width, height, frames] of validation videos."
    )
    schedule: Literal["shifted"] | list[float] | None = Field(
        None,
        description="Noise levels to sample at: null = the version's (distilled 0.9.7/0.9.8: Lightricks' fixed 7, "
        "[1.0, 0.9937, 0.9875, 0.9812, 0.975, 0.9094, 0.725]; dev: shifted), `shifted` = LTXV's resolution-shifted "
        "schedule of inference_steps steps (diffusers' LTXPipeline, ComfyUI's LTXVScheduler), or a list from 1.0 down.",
    )
    inference_steps: int | None = Field(
        None,
        ge=1,
        description="Steps of the shifted schedule (null = the version's: dev 20 - Lightricks uses 30-40, 20 keeps "
        "validation fast - 0.9.6 distilled 8). A fixed schedule has its own length.",
    )
    guidance_scale: float | None = Field(
        None, ge=1.0, description="Classifier-free guidance scale (null = the version's: dev 3, distilled 1 = off)."
    )
    decode_timestep: float | None = Field(
        None, ge=0.0, le=1.0, description="VAE decode timestep (null = the version's: 0.05; 0.9.0's VAE ignores it)."
    )
    decode_noise_scale: float | None = Field(
        None, ge=0.0, le=1.0, description="Noise mixed into the latents before decoding (null = the version's: 0.025)."
    )
    frame_rate: float | None = Field(
        None, gt=0, description="Frame rate the model is told and the mp4 plays at (null = 25: ComfyUI, diffusers)."
    )
    image_cond_noise_scale: float | None = Field(
        None, ge=0.0, le=1.0, description="Noise added to the first-frame image condition (null = 0.15, as Lightricks)."
    )
    seed: int = Field(42, description="Seed for validation noise.")
    videos_per_prompt: int = Field(1, ge=1, description="Videos generated per prompt.")

    @field_validator("video_dims")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if len(v) != 3:
            raise ValueError(f"expected [width, height, frames], got {shown(v)}")
        if problems := check_video_dims(*v):
            raise ValueError("; ".join(problems))
        return v

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_word(cls, v):
        if isinstance(v, str) and v != "shifted":
            raise ValueError(f"expected null, shifted or a list of noise levels from 1.0 down, got {v!r}")
        return v

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v):
        if isinstance(v, list):
            ok = v and v[0] == 1.0 and all(0 < b < a for a, b in zip(v, v[1:], strict=False)) and v[-1] > 0
            if not ok:
                raise ValueError(f"a schedule is noise levels from 1.0 down, each > 0 (e.g. [1.0, 0.9, 0.7]), got {v}")
        return v


class AccelerationConfig(_Section):
    compile: bool = Field(False, description="torch.compile the transformer blocks (GPU; first steps are slow).")
    quantize_base: Literal["none", "int8", "fp8"] = Field(
        "none",
        description="Store the frozen base weights of the transformer blocks quantized (LoRA only; the adapter trains "
        "in full precision). int8: weight-only int8 through torchao (pip install torchao), about half the weight "
        "memory of bf16; needs training.enable_gradient_checkpointing. fp8: not implemented yet.",
    )
    block_swap: int = Field(
        0, ge=0, description="Transformer blocks kept on the CPU and swapped in. Not implemented yet: only 0 runs."
    )


class Config(_Section):
    dataset: DatasetConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    checkpoints: CheckpointsConfig = Field(default_factory=CheckpointsConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    acceleration: AccelerationConfig = Field(default_factory=AccelerationConfig)
    output_dir: str = Field("outputs", description="Where run_YYYYMMDD_HHMMSS/ folders are created.")
    seed: int = Field(
        42, ge=0, lt=2**31, description="Seed for weights init, noise, timesteps and data order (0 to 2^31-1)."
    )

    @field_validator("output_dir")
    @classmethod
    def _output_given(cls, v: str) -> str:
        return non_empty_path(v, "outputs")

    def _strategy_problems(self) -> list[str]:
        v, ic = self.validation, self.training.strategy == "ic_lora"
        problems = []
        if ic and not self.dataset.reference_folder:
            problems.append(
                "dataset.reference_folder: training.strategy ic_lora needs the folder of reference videos "
                "(one per clip, same relative path and name as the clip)"
            )
        if not ic and self.dataset.reference_folder:
            problems.append("dataset.reference_folder: only used by training.strategy: ic_lora (set it, or drop this)")
        if not ic and self.dataset.reference_downscale != 1:
            problems.append("dataset.reference_downscale: only used by training.strategy: ic_lora (drop it)")
        if v.reference_videos is not None:
            if not ic:
                problems.append("validation.reference_videos: only used by training.strategy: ic_lora")
            elif len(v.reference_videos) != len(v.prompts):
                problems.append(
                    f"validation.reference_videos: give one video per prompt ({len(v.prompts)}), "
                    f"got {len(v.reference_videos)}"
                )
        if ic and v.interval is not None and v.reference_videos is None:
            problems.append("validation.reference_videos: ic_lora validation needs one reference video per prompt")
        if ic and v.images is not None:
            problems.append("validation.images: not used with training.strategy: ic_lora (give reference_videos)")
        return problems

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems = []
        v = self.validation
        if v.interval is not None and not v.prompts:
            problems.append("validation.prompts: validation is on (interval set) but no prompts are given")
        if v.images is not None and len(v.images) != len(v.prompts):
            problems.append(
                f"validation.images: give one image per prompt ({len(v.prompts)}), got {len(v.images)} (null for a "
                "text-only prompt, e.g. images: [first.png, null])"
            )
        problems += self._strategy_problems()
        data, out = (Path(p).expanduser().resolve() for p in (self.dataset.data_folder, self.output_dir))
        if out == data or data in out.parents:
            problems.append(
                f"output_dir: {self.output_dir} is inside dataset.data_folder {self.dataset.data_folder}, so the run's "
                "own files (validation videos) would be read as clips; put output_dir outside it"
            )
        q = self.acceleration.quantize_base
        if q != "none" and self.model.training_mode != "lora":
            problems.append(
                f"acceleration.quantize_base: {q} needs model.training_mode: lora (a full fine-tune trains the base "
                "weights, so set quantize_base: none for it)"
            )
        elif q == "int8" and not self.training.enable_gradient_checkpointing:
            # Each int8 layer dequantizes its weight for the matmul, and autograd keeps that copy for the backward
            # pass: without checkpointing every block's copy stays alive, more memory than the bf16 base itself.
            problems.append(
                "acceleration.quantize_base: int8 needs training.enable_gradient_checkpointing: true (without it "
                "the backward pass keeps a dequantized copy of every block's weights, more memory than none)"
            )
        problems += self._sharding_problems()
        if problems:
            raise ValueError("; ".join(problems))
        self._family_defaults()
        return self

    def _family_defaults(self) -> None:
        """Defaults that depend on the model family, where the YAML leaves them out: LTX-2 prompts are padded to
        1024 Gemma tokens (its pipelines' max_sequence_length; the connectors' registers fill the padding)."""
        pp = self.dataset.preprocessing
        if "max_text_length" in pp.model_fields_set:
            return
        from .models.sources import resolve

        try:  # resolved without caching it on the model section: a validated config stays a plain value
            family = resolve(self.model.model_source).family
        except Exception:  # an unknown model_source is reported where it is used, with its own message
            return
        if family == "ltx2":
            pp.max_text_length = 1024

    def _sharding_problems(self) -> list[str]:
        t, fsdp = self.training, self.training.sharding == "fsdp"
        if not fsdp:
            return ["training.cpu_offload: only used with training.sharding: fsdp"] if t.cpu_offload else []
        refused = {  # setting -> why it does not go with sharding (yet)
            "acceleration.quantize_base": (self.acceleration.quantize_base != "none", "int8 weights are not sharded"),
            "acceleration.compile": (self.acceleration.compile, "not tried with FSDP2 yet"),
            "training.optimizer_type": (t.optimizer_type != "adamw", "adamw8bit cannot step sharded weights"),
            "training.mixed_precision_mode": (t.mixed_precision_mode == "fp16", "fp16 needs a sharded grad scaler"),
            "validation.interval": (self.validation.interval is not None, "validate the exported checkpoint instead"),
        }
        problems = [
            f"{key}: not available with training.sharding: fsdp ({why}): change it, or set training.sharding: none"
            for key, (bad, why) in refused.items()
            if bad
        ]
        if not (t.distributed or t.accelerate_config) or t.num_processes == 1:
            problems.append(
                "training.sharding: fsdp shards over several processes: set training.distributed: true and "
                "training.num_processes of 2 or more (or training.accelerate_config)"
            )
        return problems

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at a location like ('training',) in the schema."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_error(err: dict) -> str:
    wrappers = ("function-after", "function-before")
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(wrappers)))
    path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc)
    path = path.replace(".[", "[")
    etype = err["type"]
    got = err.get("input")
    if etype == "model_type":
        what = "a list" if isinstance(got, list) else shown(got)
        if isinstance(got, list):
            fix = "remove the '- ' before its keys"
        else:
            fix = f"set a key inside it, e.g. {path}.KEY=VALUE"
        return f"{path}: is a section of `key: value` lines, got {what} ({fix})"
    if etype == "list_type" and not isinstance(got, dict):
        return f"{path}: expected a list, got {shown(got)}" + (f" (write [{got[:80]}])" if isinstance(got, str) else "")
    if etype == "string_type" and isinstance(got, (bool, int, float)):
        return f"{path}: expected text, got {shown(got)} (YAML read it as a {type(got).__name__}: put it in quotes)"
    if etype == "extra_forbidden":
        key = str(loc[-1])
        known = _known_keys(Config, loc[:-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = (
            f"did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}?"
            if close
            else f"known keys: {', '.join(known)}"
        )
        return f"{path}: unknown key ({hint})"
    if etype == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if etype == "value_error":
        # Validators join several problems with "; " and may start each with an index like "[1]: ".
        parts = [m.strip() for m in msg.split("; ")]
        out = []
        for m in parts:
            if m.startswith("[") and "]: " in m:
                idx, rest = m.split(": ", 1)
                out.append(f"{path}{idx}: {rest}")
            else:
                out.append(f"{path}: {m}" if path else m)
        return "\n".join(out)
    got_s = f" (got {shown(got)})" if etype not in ("value_error",) and not isinstance(got, dict) else ""
    return f"{path}: {msg}{got_s}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError([f"override {dotted}: {part} is a value, not a section"])
        node = child
    node[parts[-1]] = value


def _dotted_key_fix(dotted: str) -> str:
    """Overrides may name a nested key by its section only (`preprocessing.batch_size`): map to the full path."""
    head = dotted.split(".", 1)[0]
    if head not in Config.model_fields and head in DatasetConfig.model_fields:
        return f"dataset.{dotted}"
    return dotted


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected key=value, e.g. training.steps=10"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError([f"override {text!r}: bad key {key!r}"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError([f"override {text!r}: value is not valid YAML ({e.__class__.__name__})"]) from None
    return _dotted_key_fix(key), value


def validate_config(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([line for err in e.errors() for line in _format_error(err).split("\n")]) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by later keys
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is written twice (lines {first} and {key_node.start_mark.line + 1}); "
                    "keep one of them",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def read_config_text(path: Path) -> str:
    """The file as UTF-8 text (a UTF-8 BOM is fine), read as bytes so that a binary file, another encoding or
    an unreadable file gets one line with the fix instead of a decoder traceback."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config file ({e.strerror or e}); check its permissions"]) from None
    save_as = "save it as UTF-8 (most editors: Save with Encoding -> UTF-8)"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError([f"{path}: the config file is UTF-16 encoded; {save_as}"])
    if b"\x00" in data[:4096]:
        raise ConfigError([f"{path}: a binary file, not a YAML config (it contains NUL bytes); pass the .yaml file"])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            [f"{path}: line {line}: byte 0x{data[e.start]:02x} is not UTF-8 (e.g. a Latin-1 accent); {save_as}"]
        ) from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            [f"{path}: config file not found (pass the path to a YAML file, e.g. configs/quickstart.yaml)"]
        )
    try:
        raw = yaml.load(read_config_text(path), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        if "'\\t'" in problem:
            problem += " (indent with spaces, not tabs)"
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections (dataset:, model:, ...)"])
    return raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read the YAML, apply `key=value` overrides (values parsed as YAML), validate everything at once."""
    raw = load_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return validate_config(raw)


# --------------------------------------------------------------------------------------------------
# The config reference (docs/CONFIG.md), generated from the schema


def config_reference_markdown() -> str:
    def rows(model: type[BaseModel], prefix: str) -> list[str]:
        out = []
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out += rows(ann, f"{prefix}{name}.")
                continue
            if f.is_required():
                default = "(required)"
            else:
                default = f.default_factory() if f.default_factory else f.default
                default = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
                default = default.removesuffix("\n...").strip()
                default = f"`{default}`"
            out.append(f"| `{prefix}{name}` | {default} | {f.description or ''} |")
        return out

    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    return "\n".join(lines + rows(Config, ""))


if __name__ == "__main__":
    import sys

    if "--markdown" in sys.argv:
        print(config_reference_markdown())

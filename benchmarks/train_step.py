"""Training-step benchmark: s/step, tokens/s, model TFLOP/s, MFU and peak memory of OUR training step.

    python benchmarks/train_step.py --model LTXV_13B_097_DEV --device cuda [--dims 768x768x97,512x512x49]
        [--modes lora,full] [--checkpointing on,off] [--compile off] [--steps 10] [--warmup 3] [--rank 128]
        [--preset default|low_vram] [--peak-tflops 989] [--json rows.json] [--sync-debug]
    python benchmarks/train_step.py --model tiny --device cpu --dims 128x96x17 --steps 2 --warmup 1   # CI

The transformer is built from the named version's shipped config with random bf16 weights created directly
on the device (no download, no CPU copy of 13B), or the tiny model. Each configuration then goes through the
training code itself: `prepare_transformer` (LoRA / full, checkpointing, compile), `build_optimizer`,
`build_lr_scheduler`, an accelerate `Accelerator` with the run's mixed precision (as `_fit` does), and per
step `training_step` + `accelerator.backward` + `clip_grad_norm_` + optimizer/scheduler step, on a synthetic
batch of the cached layout (latents [B,128,(F-1)/8+1,H/32,W/32], prompt_embeds [B,128,caption_channels],
mask, fps) copied from the host each step the way `CachedDataset.load_batch` does. Reading the cache from
disk is not timed. Warm-up steps (compilation, cuBLAS heuristics, allocator growth) are not timed; the timed
steps run without host syncs and end with one device sync. `--rounds` rounds of `--steps` steps are timed: the
table shows the best round (s/step) and the median one. `bare_s/step` (best round; its rounds alternate with
ours) times the same model and optimizer doing a plain forward, MSE, backward and optimizer step (no seeded
generators, clipping, LR schedule, accumulation bookkeeping): `ours/bare` is what the training loop's step costs on
top of the model itself.

FLOPs per step (B samples of T video tokens, L text tokens, inner width d, n layers):
    forward   F = 2*T*N_video + 2*L*N_text + n*(4*T^2*d + 4*T*L*d)
        N_video: weights of the Linear layers applied to every video token (self-attention q/k/v/out,
                 cross-attention q/out, feed-forward, proj_in, proj_out);
        N_text:  weights applied to the text tokens only (cross-attention k/v, caption projection);
        4*T^2*d: self-attention QK^T and AV; 4*T*L*d: cross-attention. Timestep embedding (per sample),
                 norms, RoPE, LoRA adapters: not counted (< 2%).
    full fine-tune: 3 * F (backward = grads of activations + grads of weights)
    LoRA:           2 * F_linear + 3 * F_attention (frozen Linear layers need no weight gradient; attention has
                    no weights, its backward still computes dQ, dK, dV: twice its forward)
    x B per step. Recomputation under gradient checkpointing is NOT counted (standard MFU convention), so
    checkpointing shows up as lower MFU.
MFU = model FLOP/s / the GPU's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s; --peak-tflops to override).
A large bf16 matmul reaches ~770-800 TFLOP/s on those cards, a practical ceiling below the datasheet peak.
On the CPU the GPU-only columns (MFU, peak memory) print n/a.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # also runs from a checkout without `pip install -e .`

from ltxv_tuner import dataset, preflight, training  # noqa: E402
from ltxv_tuner.config import Config, load_config, validate_config  # noqa: E402
from ltxv_tuner.errors import ConfigError, UserError  # noqa: E402
from ltxv_tuner.models import ltxv as models  # noqa: E402
from ltxv_tuner.models import ltxv_tiny as tiny  # noqa: E402

LOW_VRAM_CONFIG = ROOT / "configs" / "low_vram_24gb.yaml"
TEXT_TOKENS = 128  # preprocessing.max_text_length default: the cached prompt_embeds length
FPS = 24.0
GIB = 1024**3
FORMULA = (
    "FLOPs/step = B * k * F; F = 2*T*N_video + 2*L*N_text + layers*(4*T^2*d + 4*T*L*d); "
    "full: 3*F, LoRA: 2*F_linear + 3*F_attention; checkpointing recompute not counted"
)
COLUMNS = [
    ("model", 18), ("mode", 5), ("ckpt", 4), ("compile", 7), ("dims", 11), ("tokens", 7), ("s/step", 8),
    ("tokens/s", 9), ("TFLOP/step", 10), ("TFLOP/s", 8), ("MFU", 6), ("peak_alloc_GiB", 14),
    ("peak_reserved_GiB", 17), ("median_s/step", 13), ("bare_s/step", 11), ("ours/bare", 9), ("status", 6),
]  # fmt: skip

# Dense bf16 tensor-core peaks (datasheet, without sparsity), TFLOP/s, matched on torch.cuda.get_device_name.
_PEAKS = [("H200", 989.0), ("H100 PCIE", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0)]


def peak_tflops_for(device_name: str) -> float | None:
    name = device_name.upper()
    return next((peak for key, peak in _PEAKS if key in name), None)


def parse_dims(text: str) -> list[tuple[int, int, int]]:
    from ltxv_tuner.config import check_video_dims

    dims = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise UserError(f"--dims: {item!r} is not WIDTHxHEIGHTxFRAMES (e.g. 768x768x97)")
        w, h, f = map(int, parts)
        if problems := check_video_dims(w, h, f):
            raise UserError(f"--dims: {item}: {'; '.join(problems)}")
        dims.append((w, h, f))
    return dims


def parse_choices(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise UserError(f"{flag}: {text!r}: use a comma-separated subset of {', '.join(allowed)}")
    return values


# --------------------------------------------------------------------------------------------------
# FLOP count


def _transformer_class():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel


def linear_weight_counts(tcfg: dict) -> dict[str, int]:
    """Weights of the Linear layers by the tokens they see, from a meta-device model (no memory)."""
    with torch.device("meta"):
        model = _transformer_class()(**tcfg)
    counts = {"video": 0, "text": 0, "sample": 0}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.startswith("caption_projection") or name.endswith(("attn2.to_k", "attn2.to_v")):
            counts["text"] += module.weight.numel()
        elif name.startswith("time_embed"):
            counts["sample"] += module.weight.numel()
        else:
            counts["video"] += module.weight.numel()
    return counts


def step_flops(tcfg: dict, counts: dict[str, int], tokens: int, text_tokens: int, batch: int, mode: str) -> float:
    """Model FLOPs of one optimizer step (the formula in the module docstring)."""
    d = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    t, length = tokens, text_tokens
    linear = 2 * t * counts["video"] + 2 * length * counts["text"]
    attention = tcfg["num_layers"] * (4 * t * t * d + 4 * t * length * d)
    per_sample = 3 * (linear + attention) if mode == "full" else 2 * linear + 3 * attention
    return float(batch * per_sample)


# --------------------------------------------------------------------------------------------------
# One configuration


def build_transformer(model: str, device: torch.device) -> torch.nn.Module:
    """Random weights of the real architecture, created on the device (bf16 for the named versions)."""
    torch.manual_seed(0)
    if model == "tiny":
        return tiny.build_tiny_transformer().to(device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return _transformer_class()(**models.transformer_config(model))
    finally:
        torch.set_default_dtype(previous)


def synthetic_batch(tcfg: dict, dims: tuple[int, int, int], batch: int) -> dict[str, torch.Tensor]:
    """A host batch in the cache's layout (what CachedDataset.load_batch stacks before the copy)."""
    w, h, f = dims
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, TEXT_TOKENS, dtype=torch.int64)
    mask[:, : TEXT_TOKENS // 4] = 1  # a typical caption fills a quarter of the 128 T5 tokens
    return {
        "latents": torch.randn(batch, tcfg["in_channels"], (f - 1) // 8 + 1, h // 32, w // 32, generator=g),
        "prompt_embeds": torch.randn(batch, TEXT_TOKENS, tcfg["caption_channels"], generator=g),
        "prompt_attention_mask": mask,
        "fps": torch.full((batch,), FPS),
    }


def row_config(base: Config, model: str, dims, mode: str, ckpt: bool, compile_: bool, rank: int | None) -> Config:
    raw = base.model_dump(mode="json")
    raw["dataset"]["resolution_buckets"] = [list(dims)]
    raw["model"].update(model_source=model, training_mode=mode)
    if rank is not None:
        raw["lora"].update(rank=rank, alpha=rank)
    raw["training"]["enable_gradient_checkpointing"] = ckpt
    raw["training"]["gradient_accumulation_steps"] = 1  # one micro-batch per timed step
    raw["acceleration"]["compile"] = compile_
    raw["validation"]["interval"] = None
    return validate_config(raw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_configuration(
    accelerator, cfg: Config, model: str, host_batch: dict, steps: int, warmup: int, sync_debug: bool = False,
    rounds: int = 1,
) -> dict:  # fmt: skip
    """Build, prepare, warm up, then time `rounds` x `steps` optimizer steps of the training loop's own step
    (best and median round), and as many bare forward/backward/optimizer steps of the same model (best round)."""
    device = accelerator.device
    preflight.check_acceleration(cfg)  # e.g. fp8: the row says why instead of timing something else
    transformer = training.prepare_transformer(cfg, device, transformer=build_transformer(model, device))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = training.build_optimizer(params, cfg, device)
    lr_scheduler = training.build_lr_scheduler(optimizer, cfg)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)

    def one_step(step: int) -> torch.Tensor:  # the training loop's own step, one micro-batch
        batch = dataset.batch_to_device(host_batch, device)  # the copy the loop makes of each batch it reads
        loss, _ = training.optimizer_step(accelerator, transformer, optimizer, lr_scheduler, params, [batch], step, cfg)
        return loss

    def bare_step(step: int) -> torch.Tensor:  # the same model and optimizer without the loop's bookkeeping
        batch = dataset.batch_to_device(host_batch, device)
        latents = batch["latents"]
        b, _, f, h, w = latents.shape
        x0 = models.pack_latents(latents.float())
        noise = torch.randn_like(x0)
        pred = models.forward(transformer, 0.5 * x0 + 0.5 * noise, torch.full((b,), 500.0, device=device), batch,
                              (f, h, w))  # fmt: skip
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def timed(fn, first: int) -> tuple[float, list[torch.Tensor]]:
        _sync(device)
        t0 = time.perf_counter()
        losses = [fn(first + i) for i in range(steps)]
        _sync(device)
        return time.perf_counter() - t0, losses

    for step in range(warmup):
        one_step(step)
    debug = sync_debug and device.type == "cuda"  # every host sync inside our timed steps prints a warning
    ours, bare, done = [], [], None
    for r in range(rounds):  # alternated with the bare rounds: a busy moment of a shared machine hits both alike
        if debug:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            ours.append(timed(one_step, warmup + r * steps))
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode("default")
        if r == rounds - 1:  # the optimizer's step count: ours, and the bare rounds' so far
            state = optimizer.state[params[0]] if params[0] in optimizer.state else {}
            done = int(state["step"]) - r * steps if "step" in state else None
        bare.append(timed(bare_step, 0)[0])
    last_loss = float(ours[-1][1][-1])  # after the timing: one value to show the steps computed something finite
    trainable = sum(p.numel() for p in params)
    seconds = sorted(t for t, _ in ours)
    return {"seconds": seconds[0], "median_seconds": seconds[len(seconds) // 2], "bare_seconds": min(bare),
            "loss": last_loss, "optimizer_steps": done, "trainable_params": trainable}  # fmt: skip


def _free(accelerator, device: torch.device) -> None:
    accelerator.free_memory()  # drops accelerate's references to the model/optimizer of the last configuration
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(accelerator, base: Config, args, tcfg, counts, dims, mode, ckpt, compile_, peak) -> dict:
    device = accelerator.device
    w, h, f = dims
    tokens = (w // 32) * (h // 32) * ((f - 1) // 8 + 1)
    row = {
        "model": args.model, "mode": mode, "ckpt": "on" if ckpt else "off", "compile": "on" if compile_ else "off",
        "dims": f"{w}x{h}x{f}", "tokens": tokens * args.batch, "batch": args.batch, "steps": args.steps,
        "warmup": args.warmup, "s/step": None, "tokens/s": None, "TFLOP/step": None, "TFLOP/s": None, "MFU": None,
        "peak_alloc_GiB": None, "peak_reserved_GiB": None, "median_s/step": None, "bare_s/step": None,
        "ours/bare": None, "status": "ok", "loss": None, "optimizer_steps": None,
        "trainable_params": None,
    }  # fmt: skip
    try:
        cfg = row_config(base, args.model, dims, mode, ckpt, compile_, args.rank)
    except ConfigError as e:  # e.g. full mode with the low_vram preset's int8 base: the row says why
        row["status"] = f"error: {'; '.join(e.problems)}"
        return row
    row["rank"] = cfg.lora.rank if mode == "lora" else None
    flops = step_flops(tcfg, counts, tokens, TEXT_TOKENS, args.batch, mode)
    row["TFLOP/step"] = flops / 1e12
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    host_batch = synthetic_batch(tcfg, dims, args.batch)
    try:
        result = time_configuration(
            accelerator, cfg, args.model, host_batch, args.steps, args.warmup, args.sync_debug, args.rounds
        )
    except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError
        row["status"] = "OOM"
        result = None
    except UserError as e:  # e.g. adamw8bit without bitsandbytes: the row says why, the others still run
        row["status"] = f"error: {e}"
        result = None
    if device.type == "cuda":
        row["peak_alloc_GiB"] = torch.cuda.max_memory_allocated(device) / GIB
        row["peak_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / GIB
    _free(accelerator, device)
    if result is None:
        return row
    s_step = result["seconds"] / args.steps
    row.update({k: result[k] for k in ("loss", "optimizer_steps", "trainable_params")})
    row["s/step"] = s_step
    row["median_s/step"] = result["median_seconds"] / args.steps
    row["bare_s/step"] = result["bare_seconds"] / args.steps
    row["ours/bare"] = s_step / row["bare_s/step"]
    row["tokens/s"] = tokens * args.batch / s_step
    row["TFLOP/s"] = flops / s_step / 1e12
    row["MFU"] = row["TFLOP/s"] / peak if peak else None
    if not math.isfinite(result["loss"]):
        row["status"] = "ok (loss not finite: random weights)"
    return row


# --------------------------------------------------------------------------------------------------
# Output


def format_row(row: dict) -> str:
    cells = []
    for name, width in COLUMNS:
        value = row[name]
        if value is None:
            text = "n/a"
        elif name == "MFU":
            text = f"{value:.1%}"
        elif isinstance(value, float):
            text = f"{value:.4g}"
        else:
            text = str(value)
        cells.append(text.ljust(width))
    return "  ".join(cells).rstrip()


def make_accelerator(cfg: Config, device: torch.device):
    """As training.make_accelerator, but on the device asked for (a CPU run on a GPU machine stays on the CPU)."""
    from accelerate import Accelerator

    mixed = training.resolve_mixed_precision(cfg, device.type == "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Accelerator(mixed_precision=mixed, step_scheduler_with_optimizer=False, cpu=device.type != "cuda")


def base_config(preset: str) -> Config:
    if preset == "low_vram":
        return load_config(LOW_VRAM_CONFIG)
    return validate_config({"dataset": {"data_folder": "unused"}, "training": {"mixed_precision_mode": "bf16"}})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny | LTXV_13B_097_DEV | LTXV_2B_0.9.6_DEV (any named version)")
    p.add_argument("--dims", default="768x768x97,512x512x49", help="comma-separated WIDTHxHEIGHTxFRAMES")
    p.add_argument("--modes", default=None, help="comma-separated: lora, full (default both; low_vram: lora)")
    p.add_argument("--checkpointing", default=None, help="on,off (default); the low_vram preset: on")
    p.add_argument("--compile", default="off", help="acceleration.compile values to try: off, on or on,off")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator growth)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of --steps steps: best and median are shown")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (alpha = rank); default 128, low_vram: its own")
    p.add_argument("--batch", type=int, default=1, help="clips per step")
    p.add_argument("--preset", choices=["default", "low_vram"], default="default",
                   help="default: bf16, adamw; low_vram: the options of configs/low_vram_24gb.yaml")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--sync-debug", action="store_true", help="CUDA: warn on every host sync in the timed steps")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.rounds < 1:
        raise UserError("--steps, --rounds and --batch must be >= 1, --warmup >= 0")
    dims_list = parse_dims(args.dims)
    modes_default = "lora" if args.preset == "low_vram" else "lora,full"  # its int8 base is for LoRA only
    modes = parse_choices(args.modes or modes_default, "--modes", ("lora", "full"))
    ckpt_default = "on" if args.preset == "low_vram" else "on,off"
    ckpts = [v == "on" for v in parse_choices(args.checkpointing or ckpt_default, "--checkpointing", ("on", "off"))]
    compiles = [v == "on" for v in parse_choices(args.compile, "--compile", ("on", "off"))]
    if args.rank is None and args.preset == "default":
        args.rank = 128
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device visible (use --device cpu with --model tiny)")
        torch.cuda.set_device(device)
        device_name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or peak_tflops_for(device_name)
    else:
        device_name, peak = "cpu", None  # MFU against a GPU peak means nothing on the CPU
    tcfg = dict(tiny.TINY_TRANSFORMER_CONFIG) if args.model == "tiny" else models.transformer_config(args.model)
    counts = linear_weight_counts(tcfg)

    base = base_config(args.preset)
    accelerator = make_accelerator(base, device)
    print(f"# train_step benchmark: model {args.model}, device {device_name}, torch {torch.__version__}, "
          f"preset {args.preset} ({accelerator.mixed_precision}, {base.training.optimizer_type}), batch {args.batch}, "
          f"{args.warmup} warm-up + {args.rounds} x {args.steps} timed steps, "
          f"{torch.get_num_threads()} CPU threads")  # fmt: skip
    print(f"# {FORMULA}")
    print(f"# N_video {counts['video'] / 1e9:.3f} G, N_text {counts['text'] / 1e9:.3f} G, L {TEXT_TOKENS}, "
          f"d {tcfg['num_attention_heads'] * tcfg['attention_head_dim']}, layers {tcfg['num_layers']}; "
          f"MFU against {f'{peak:g} TFLOP/s dense bf16' if peak else 'n/a (no GPU peak known)'}")  # fmt: skip
    print("  ".join(name.ljust(width) for name, width in COLUMNS), flush=True)
    rows = []
    for dims in dims_list:
        for mode in modes:
            for ckpt in ckpts:
                for compile_ in compiles:
                    row = run_row(accelerator, base, args, tcfg, counts, dims, mode, ckpt, compile_, peak)
                    rows.append(row)
                    print(format_row(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        header = {"model": args.model, "device": device_name, "torch": torch.__version__, "preset": args.preset,
                  "peak_tflops": peak, "formula": FORMULA, "n_video": counts["video"], "n_text": counts["text"],
                  "text_tokens": TEXT_TOKENS}  # fmt: skip
        args.json.write_text(json.dumps({**header, "rows": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

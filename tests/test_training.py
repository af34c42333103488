"""Training stage on the tiny LTXV with a synthetic cache (random latents/embeddings in the real layout)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ltxv_tuner import cache, checkpoints, training
from ltxv_tuner.config import validate_config
from ltxv_tuner.dataset import BatchOrder, CachedDataset, batch_to_device, epoch_batches, step_batches
from ltxv_tuner.errors import UserError
from ltxv_tuner.models import ltxv
from ltxv_tuner.preflight import QUANT_PACKAGE
from ltxv_tuner.strategies import text_to_video
from ltxv_tuner.strategies.flow_matching import flow_matching_loss, sample_sigmas
from ltxv_tuner.strategies.text_to_video import first_frame_mask

TEXT_LEN = 8


def make_cache(data_folder: Path, buckets=((64, 64, 9),), clips_per_bucket=2, seed=0, fps=24.0) -> Path:
    """A .precomputed/ cache + manifest exactly as preprocessing writes it; returns the manifest path."""
    g = torch.Generator().manual_seed(seed)
    root = cache.cache_root(data_folder)
    clips = []
    for w, h, f in buckets:
        for i in range(clips_per_bucket):
            name = f"clip_{w}x{h}x{f}_{i}.mp4"
            shape = [128, (f - 1) // 8 + 1, h // 32, w // 32]
            lkey = cache.hash_key({"video": name, "seed": seed, "bucket": [w, h, f]})
            ckey = cache.hash_key({"caption": name, "seed": seed})
            cache.save_tensors_atomic(cache.latent_path(root, lkey), {"latents": torch.randn(shape, generator=g)})
            mask = torch.zeros(TEXT_LEN, dtype=torch.int64)
            mask[: 3 + i % 4] = 1
            conds = {"prompt_embeds": torch.randn(TEXT_LEN, 32, generator=g), "prompt_attention_mask": mask}
            cache.save_tensors_atomic(cache.condition_path(root, ckey), conds)
            clips.append(cache.CachedClip(name, f"caption {i}", [w, h, f], fps, lkey, ckey, shape))
    manifest = cache.Manifest(settings={"buckets": [list(b) for b in buckets]}, clips=clips)
    path = cache.manifest_path(root, cache.hash_key(manifest.settings))
    cache.write_json_atomic(path, manifest.to_json())
    return record_checksums(path)


def record_checksums(manifest: Path) -> Path:
    """Record the size and checksum of every cache file the manifest names, as preprocessing does when it writes it
    (after a test wrote its own files)."""
    root, m = manifest.parent.parent, cache.Manifest.read(manifest)
    files = [cache.latent_path(root, c.latent_key) for c in m.clips]
    files += [cache.condition_path(root, c.condition_key) for c in m.clips]
    files += [cache.latent_path(root, c.reference_key) for c in m.clips if c.reference_key]
    m.files = {p.relative_to(root).as_posix(): p.stat().st_size for p in files}
    m.checksums = {p.relative_to(root).as_posix(): cache.file_checksum(p) for p in files}
    cache.write_json_atomic(manifest, m.to_json())
    return manifest


def make_config(tmp_path: Path, buckets=((64, 64, 9),), **sections):
    """A tiny-model config; `sections` are merged into the YAML tree (e.g. training={"steps": 3})."""
    raw = {
        "dataset": {"data_folder": str(tmp_path / "data"), "resolution_buckets": [list(b) for b in buckets]},
        "model": {"model_source": "tiny", "training_mode": "lora"},
        "lora": {"rank": 4, "alpha": 4},
        "training": {"steps": 4, "learning_rate": 1e-3, "mixed_precision_mode": "no", "scheduler_type": "constant"},
        "checkpoints": {"interval": 2, "save_dtype": "fp32"},
        "output_dir": str(tmp_path / "outputs"),
        "seed": 7,
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return validate_config(raw)


def trainable_from_checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    return cache.load_tensors(ckpt / "state" / "trainable.safetensors")


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return make_cache(tmp_path / "data")


# --------------------------------------------------------------------------------------------------
# Pure helpers


def test_pack_latents_token_order_matches_ltx_pipeline():
    from diffusers import LTXPipeline

    x = torch.randn(2, 128, 3, 2, 4)
    assert torch.equal(ltxv.pack_latents(x), LTXPipeline._pack_latents(x, 1, 1))


def test_timestep_shift_is_linear_between_ltxv_anchor_points():
    assert ltxv.scheduler_shift(1024) == pytest.approx(0.95)
    assert ltxv.scheduler_shift(4096) == pytest.approx(2.05)
    assert ltxv.scheduler_shift(2560) == pytest.approx(1.5)


def test_timestep_shift_equals_the_pre_recut_formula_in_float32():
    """The shift now comes from diffusers' calculate_shift; in float32 (where the sigmas are drawn) it equals
    the formula training used before for every sequence length, so runs are unchanged bit for bit."""
    old = [0.95 + (n - 1024) * (2.05 - 0.95) / (4096 - 1024) for n in range(1, 40_000)]
    new = [ltxv.scheduler_shift(n) for n in range(1, 40_000)]
    assert torch.equal(torch.tensor(old, dtype=torch.float32), torch.tensor(new, dtype=torch.float32))


def test_sigmas_shift_towards_noise_for_long_sequences():
    g = torch.Generator().manual_seed(0)
    short = sample_sigmas(4000, ltxv.scheduler_shift(64), g)
    long = sample_sigmas(4000, ltxv.scheduler_shift(8192), g)
    flat = sample_sigmas(4000, 0.0, g)
    assert ((short > 0) & (short < 1)).all()
    assert long.mean() > short.mean() + 0.2
    assert abs(flat.mean().item() - 0.5) < 0.03  # no shift: symmetric logit-normal


def test_first_frame_mask_covers_only_first_latent_frame_of_chosen_samples():
    g = torch.Generator().manual_seed(0)
    mask = first_frame_mask(6, tokens_per_frame=4, seq_len=12, p=1.0, generator=g)
    assert mask[:, :4].all() and not mask[:, 4:].any()
    assert not first_frame_mask(6, 4, 12, p=0.0, generator=g).any()


def _conditioning_cfg(p: float):
    return validate_config({"dataset": {"data_folder": "d"}, "training": {"first_frame_conditioning_p": p}}).training


def test_image_to_video_is_trained_by_default():
    assert validate_config({"dataset": {"data_folder": "d"}}).training.first_frame_conditioning_p == 0.5


def test_conditioned_first_frame_is_clean_at_timestep_zero_and_out_of_the_loss():
    x0 = torch.randn(3, 12, 8)  # 3 latent frames of 4 tokens
    inputs = text_to_video.prepare(x0, 4, 0.0, torch.Generator().manual_seed(0), _conditioning_cfg(1.0))
    tokens, timestep, target, keep = inputs.tokens, inputs.timestep, inputs.target, inputs.loss_mask
    assert torch.equal(tokens[:, :4], x0[:, :4])  # given as is
    assert (timestep[:, :4] == 0).all() and (timestep[:, 4:] > 0).all()
    assert (timestep[:, 4:] == timestep[:, 4:5]).all()  # one noise level per sample on the rest
    assert not keep[:, :4].any() and keep[:, 4:].all()
    garbage = target.clone()
    garbage[:, :4] += 1e3  # a prediction that is wrong only on the conditioned tokens costs nothing
    assert flow_matching_loss(garbage, target, keep).item() == 0.0
    garbage[:, 4] += 1.0
    assert flow_matching_loss(garbage, target, keep).item() > 0


def test_one_latent_frame_is_never_conditioned_but_video_buckets_still_are():
    cfg = _conditioning_cfg(1.0)
    image = torch.randn(2, 4, 8)  # one latent frame
    out = text_to_video.prepare(image, 4, 0.0, torch.Generator().manual_seed(0), cfg)
    timestep, keep = out.timestep, out.loss_mask
    assert keep is None and timestep.shape == (2,) and (timestep > 0).all()
    video = torch.randn(2, 8, 8)  # same run, a 9-frame bucket: still image-to-video
    out = text_to_video.prepare(video, 4, 0.0, torch.Generator().manual_seed(0), cfg)
    timestep, keep = out.timestep, out.loss_mask
    assert (timestep[:, :4] == 0).all() and not keep[:, :4].any()


def test_a_one_frame_bucket_with_p_1_trains_every_step(tmp_path, monkeypatch):
    """Images (bucket frames 1) with first_frame_conditioning_p 1: the loss and gradients are never zero."""
    buckets = ((64, 64, 1), (64, 64, 9))
    manifest = make_cache(tmp_path / "data", buckets=buckets)
    cfg = make_config(tmp_path, buckets=buckets, training={"steps": 6, "first_frame_conditioning_p": 1.0},
                      checkpoints={"interval": None})  # fmt: skip
    seen = []
    real = text_to_video.prepare

    def spy(x0, tokens_per_frame, *args):
        out = real(x0, tokens_per_frame, *args)
        seen.append((x0.shape[1] // tokens_per_frame, out.loss_mask is not None))
        return out

    monkeypatch.setattr(text_to_video, "prepare", spy)
    training.train(cfg, tmp_path / "run", manifest)
    rows = [json.loads(line) for line in (tmp_path / "run/logs/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert {frames for frames, _ in seen} == {1, 2}  # both buckets were trained
    assert all(conditioned == (frames > 1) for frames, conditioned in seen)


def test_loss_ignores_masked_tokens():
    pred, target = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    target[0, 0] = 100.0
    keep = torch.tensor([[False, True, True]])
    assert flow_matching_loss(pred, target, keep).item() == pytest.approx(1.0)


def test_epoch_batches_are_bucket_pure_and_cover_every_sample_once():
    groups = [[0, 1, 2, 3, 4], [5, 6, 7]]
    batches = epoch_batches(groups, batch_size=2, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(set(b) <= set(groups[0]) or set(b) <= set(groups[1]) for b in batches)
    assert batches == epoch_batches(groups, 2, seed=3, epoch=0)
    assert batches != epoch_batches(groups, 2, seed=3, epoch=1)


def _ids(batches) -> list[list[list[float]]]:
    """Each step's micro-batches, identified by their latents (first value of each clip)."""
    return [[b["latents"][:, 0, 0, 0, 0].tolist() for b in micro] for micro in batches]


@pytest.mark.parametrize("accum, world, rank", [(1, 1, 0), (2, 1, 0), (2, 2, 1)])
def test_loader_yields_the_batch_order_positions_and_resumes_mid_way(tmp_path, accum, world, rank):
    """The DataLoader reads exactly BatchOrder.at(position + micro * world + rank) per step, in a worker process
    or in this one alike, and a loader started at a later step and data position continues the same stream."""
    manifest = make_cache(tmp_path / "data", buckets=((64, 64, 9), (96, 64, 9)), clips_per_bucket=3)
    cfg = make_config(tmp_path, buckets=((64, 64, 9), (96, 64, 9)), training={"batch_size": 2})
    data = CachedDataset(manifest, cfg)
    order = BatchOrder(data.bucket_groups(), 2, seed=5)
    cpu = torch.device("cpu")
    inline = _ids(step_batches(data, order, 0, 0, 6, accum, rank, world, cpu, workers=0))
    ahead = _ids(step_batches(data, order, 0, 0, 6, accum, rank, world, cpu, workers=1))
    expected = [
        [[data[order.at(s * accum * world + m * world + rank)]["latents"][i, 0, 0, 0, 0].item()
          for i in range(len(order.at(s * accum * world + m * world + rank)))] for m in range(accum)]
        for s in range(6)
    ]  # fmt: skip
    assert inline == ahead == expected
    resumed = _ids(step_batches(data, order, 3 * accum * world, 3, 6, accum, rank, world, cpu, workers=0))
    assert resumed == inline[3:]


# --------------------------------------------------------------------------------------------------
# Model setup and the single step


def test_prepare_transformer_lora_trains_only_adapter_weights(tmp_path):
    cfg = make_config(tmp_path)
    tr = training.prepare_transformer(cfg)
    trainable = [n for n, p in tr.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("attn1.to_q.lora_A" in n for n in trainable)


def test_prepare_transformer_rejects_unknown_target_modules(tmp_path):
    cfg = make_config(tmp_path, lora={"target_modules": ["no_such_module"]})
    with pytest.raises(UserError, match="lora.target_modules"):
        training.prepare_transformer(cfg)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_training_step_gives_finite_loss_and_gradients(tmp_path, manifest, p):
    cfg = make_config(tmp_path, training={"first_frame_conditioning_p": p})
    tr = training.prepare_transformer(cfg)
    batch = CachedDataset(manifest, cfg)[[0, 1]]
    loss = training.training_step(tr, batch, torch.Generator().manual_seed(0), cfg)
    loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for p in tr.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_dataset_refuses_a_cache_made_for_other_buckets(tmp_path, manifest):
    cfg = make_config(tmp_path, buckets=((96, 64, 9),))
    with pytest.raises(UserError, match="resolution_buckets"):
        CachedDataset(manifest, cfg)


# --------------------------------------------------------------------------------------------------
# Whole training runs


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_writes_checkpoints_logs_and_metrics(tmp_path, manifest, mode):
    cfg = make_config(tmp_path, model={"training_mode": mode}, training={"steps": 4, "mixed_precision_mode": "bf16"})
    run_dir = tmp_path / "run"
    result = training.train(cfg, run_dir, manifest)

    kind = "lora" if mode == "lora" else "transformer"
    expected = [run_dir / "checkpoints" / f"step_{s:06d}" / f"ltxv_{kind}_step_{s:06d}.safetensors" for s in (2, 4)]
    assert result.final_step == 4
    assert result.checkpoints == expected
    assert all(p.is_file() for p in expected)
    assert result.final_loss is not None and math.isfinite(result.final_loss)
    assert (run_dir / "checkpoints" / "step_000004" / "state" / "training_state.json").is_file()
    assert not list((run_dir / "checkpoints").glob(".tmp*"))

    with safe_open(str(expected[-1]), "pt") as f:
        keys = list(f.keys())
    if mode == "lora":
        assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    else:
        assert "proj_in.weight" in keys and not any("lora" in k for k in keys)

    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "s_per_step", "samples_per_s", "peak_memory_mb"} <= set(rows[0])
    assert "training done: step 4" in (run_dir / "logs" / "train.log").read_text()
    assert (run_dir / "logs" / "loss.png").stat().st_size > 0


def test_training_changes_only_trainable_weights_and_they_move(tmp_path, manifest):
    cfg = make_config(tmp_path, training={"steps": 2}, checkpoints={"interval": None})
    training.train(cfg, tmp_path / "run", manifest)
    trained = trainable_from_checkpoint(tmp_path / "run" / "checkpoints" / "step_000002")
    init = checkpoints.trainable_state_dict(training.prepare_transformer(cfg))
    assert trained.keys() == init.keys()
    assert any(not torch.equal(trained[k], init[k]) for k in init)


def test_gradient_accumulation_and_batches(tmp_path):
    manifest = make_cache(tmp_path / "data", buckets=((64, 64, 9), (96, 64, 17)), clips_per_bucket=3)
    cfg = make_config(
        tmp_path,
        buckets=((64, 64, 9), (96, 64, 17)),
        training={"steps": 2, "batch_size": 2, "gradient_accumulation_steps": 2},
        checkpoints={"interval": None},
    )
    result = training.train(cfg, tmp_path / "run", manifest)
    state = json.loads((tmp_path / "run/checkpoints/step_000002/state/training_state.json").read_text())
    assert result.final_step == 2 and state["data_position"] == 4  # 2 steps x 2 micro-batches
    rows = [json.loads(line) for line in (tmp_path / "run/logs/metrics.jsonl").read_text().splitlines()]
    assert all(r["samples_per_s"] > 0 for r in rows)


def test_keep_last_n_prunes_old_checkpoints_but_keeps_newest(tmp_path, manifest):
    cfg = make_config(tmp_path, training={"steps": 5}, checkpoints={"interval": 1, "keep_last_n": 2})
    result = training.train(cfg, tmp_path / "run", manifest)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step_000004", "step_000005"]
    assert [p.parent.name for p in result.checkpoints] == kept


def test_fp16_on_cpu_falls_back_to_bf16(tmp_path, manifest, caplog):
    cfg = make_config(tmp_path, training={"steps": 1, "mixed_precision_mode": "fp16"}, checkpoints={"interval": None})
    with caplog.at_level("WARNING", logger="ltxv_tuner"):
        result = training.train(cfg, tmp_path / "run", manifest)
    assert result.final_step == 1
    assert "fp16 needs a GPU" in caplog.text


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(tmp_path, manifest):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    cfg = make_config(tmp_path, training={"steps": 1, "optimizer_type": "adamw8bit"})
    with pytest.raises(UserError, match="bitsandbytes"):
        training.train(cfg, tmp_path / "run", manifest)


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_every_scheduler_warms_up_then_follows_its_shape(tmp_path, manifest, scheduler):
    cfg = make_config(
        tmp_path,
        training={"steps": 6, "warmup_steps": 2, "scheduler_type": scheduler, "max_grad_norm": 0.01,
                  "weight_decay": 0.5},
        checkpoints={"interval": None},
    )  # fmt: skip
    training.train(cfg, tmp_path / "run", manifest)
    rows = [json.loads(line) for line in (tmp_path / "run/logs/metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows]  # lr after each step's scheduler update
    assert lrs[0] == pytest.approx(0.5e-3)  # half-way through warmup
    assert lrs[1] == pytest.approx(1e-3)  # warmup done
    if scheduler == "constant":
        assert lrs[2:] == pytest.approx([1e-3] * 4)
    else:
        assert all(b <= a for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] < 1e-3 * 0.5


def test_tiny_lora_overfits_one_clip(tmp_path):
    """120 LoRA steps on one clip: the loss falls at least 5x (12x seen), so gradients reach the adapter with the
    right sign and the optimizer applies them. The clip's latent is one colour per channel with a large mean, so
    most of the initial loss is the clip itself (what the adapter can memorise) rather than the unpredictable
    noise at low noise levels."""
    manifest = make_cache(tmp_path / "data", clips_per_bucket=1)
    clip = json.loads(manifest.read_text())["clips"][0]
    root = cache.cache_root(tmp_path / "data")
    colour = torch.randn(128, 1, 1, 1, generator=torch.Generator().manual_seed(3)) * 4
    cache.save_tensors_atomic(cache.latent_path(root, clip["latent_key"]), {"latents": colour.expand(128, 2, 2, 2)})
    record_checksums(manifest)
    cfg = make_config(
        tmp_path,
        training={"steps": 120, "learning_rate": 1e-2},
        lora={"rank": 8, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_out"]},
        checkpoints={"interval": None},
    )
    training.train(cfg, tmp_path / "run", manifest)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run/logs/metrics.jsonl").read_text().splitlines()]
    first, last = sum(losses[:10]) / 10, sum(losses[-30:]) / 30
    assert first / last >= 5, (first, last)


# --------------------------------------------------------------------------------------------------
# Acceleration options and the fast path


def test_prepare_transformer_takes_an_already_built_transformer(tmp_path):
    from ltxv_tuner.models import ltxv_tiny as tiny

    built = tiny.build_tiny_transformer()
    before = built.proj_in.weight.detach().clone()
    cfg = make_config(tmp_path, model={"training_mode": "lora"})
    tr = training.prepare_transformer(cfg, "cpu", transformer=built)
    assert tr is built  # not loaded again: the benchmark's random 13B stays the one object on the GPU
    assert torch.equal(tr.proj_in.weight, before)
    trainable = [n for n, p in tr.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize(
    "acceleration, message",
    [
        ({"quantize_base": "fp8"}, "acceleration.quantize_base: fp8 is not available yet"),
        ({"block_swap": 4}, "acceleration.block_swap: 4 is not available yet"),
    ],
)
def test_unimplemented_acceleration_options_stop_training_before_any_work(tmp_path, manifest, acceleration, message):
    cfg = make_config(tmp_path, acceleration=acceleration)
    with pytest.raises(UserError, match=message) as e:
        training.train(cfg, tmp_path / "run", manifest)
    assert "use none" in str(e.value) or "use 0" in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing was written


INT8 = {"acceleration": {"quantize_base": "int8"}, "training": {"enable_gradient_checkpointing": True}}


def _int8_config(tmp_path, quantize="int8", **sections):
    merged = {"acceleration": {"quantize_base": quantize}, "training": {"enable_gradient_checkpointing": True}}
    for k, v in sections.items():
        merged.setdefault(k, {}).update(v)
    return make_config(tmp_path, **merged)


def test_quant_int8_stores_block_weights_as_int8_and_trains_the_adapter(tmp_path, manifest):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8Tensor

    cfg = _int8_config(tmp_path, training={"steps": 3}, checkpoints={"interval": None})
    tr = training.prepare_transformer(cfg)
    base = {n: m.weight for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n}
    blocks = {n: w for n, w in base.items() if n.startswith("transformer_blocks.")}
    assert blocks and all(isinstance(w, Int8Tensor) and w.qdata.dtype == torch.int8 for w in blocks.values())
    assert not any(isinstance(w, Int8Tensor) for n, w in base.items() if n not in blocks)  # proj_in/out, embeddings
    trainable = checkpoints.trainable_state_dict(tr)
    assert trainable and all(".lora_" in n and v.dtype == torch.float32 for n, v in trainable.items())

    result = training.train(cfg, tmp_path / "run", manifest)
    assert result.final_step == 3 and math.isfinite(result.final_loss)
    trained = trainable_from_checkpoint(tmp_path / "run" / "checkpoints" / "step_000003")
    assert trained.keys() == trainable.keys()
    assert any(not torch.equal(trained[k], trainable[k]) for k in trainable)
    assert "stored as int8" in (tmp_path / "run" / "logs" / "train.log").read_text()


def test_quant_int8_lora_output_and_gradients_are_close_to_unquantized(tmp_path, manifest):
    """Same base weights, same (non-zero) adapter: int8 per-row weights change the transformer output by ~0.14%
    and the adapter gradients by at most 1-1.5% on the tiny model (measured, 3 caches); the bounds leave room."""
    pytest.importorskip("torchao")
    outputs, grads = {}, {}
    for quantize in ("none", "int8"):
        cfg = _int8_config(tmp_path, quantize)
        tr = training.prepare_transformer(cfg)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in tr.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        hook = tr.register_forward_hook(lambda m, a, out, q=quantize: outputs.__setitem__(q, out[0].detach()))
        batch = batch_to_device(CachedDataset(manifest, cfg)[[0, 1]], torch.device("cpu"))
        training.training_step(tr, batch, torch.Generator().manual_seed(0), cfg).backward()
        hook.remove()
        grads[quantize] = {n: p.grad for n, p in tr.named_parameters() if p.requires_grad}

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(outputs["int8"], outputs["none"]) < 0.02
    assert grads["int8"].keys() == grads["none"].keys()
    assert max(rel(grads["int8"][k], grads["none"][k]) for k in grads["none"]) < 0.05


def test_quant_int8_exported_lora_has_the_same_keys_and_shapes(tmp_path, manifest):
    pytest.importorskip("torchao")
    files = {}
    for quantize in ("none", "int8"):
        cfg = _int8_config(tmp_path, quantize, training={"steps": 2}, checkpoints={"interval": None})
        result = training.train(cfg, tmp_path / quantize, manifest)
        with safe_open(str(result.checkpoints[-1]), "pt") as f:
            files[quantize] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert files["int8"] == files["none"] and files["none"]


def test_quant_int8_without_the_package_is_a_clear_error(tmp_path, manifest, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, QUANT_PACKAGE, None)  # as if not installed: find_spec gives None
    cfg = _int8_config(tmp_path)
    with pytest.raises(UserError, match=r"acceleration.quantize_base: int8 needs the torchao package") as e:
        training.train(cfg, tmp_path / "run", manifest)
    assert "pip install torchao" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"model": {"training_mode": "full"}, **INT8},
            "acceleration.quantize_base: int8 needs model.training_mode: lora",
        ),
        (
            {"acceleration": {"quantize_base": "int8"}, "training": {"enable_gradient_checkpointing": False}},
            "acceleration.quantize_base: int8 needs training.enable_gradient_checkpointing: true",
        ),
    ],
)
def test_quant_settings_that_cannot_work_are_config_errors(tmp_path, sections, message):
    from ltxv_tuner.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, **sections)


def test_offload_encoders_is_gone_from_the_schema(tmp_path):
    from ltxv_tuner.errors import ConfigError

    with pytest.raises(ConfigError, match="acceleration.offload_encoders: unknown key"):
        make_config(tmp_path, acceleration={"offload_encoders": True})


def test_enable_tf32_only_for_cuda():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        training.enable_tf32(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"
        training.enable_tf32(torch.device("cuda"))  # sets flags only; needs no GPU
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # legacy getters readable
    finally:
        torch.set_float32_matmul_precision(previous)


def test_compile_compiles_each_block_and_matches_eager(tmp_path, manifest):
    # ~30 s on 2 CPU cores (inductor compiles forward and backward once; all blocks share the graph).
    grads = {}
    for compile_ in (False, True):
        cfg = make_config(
            tmp_path, acceleration={"compile": compile_}, training={"enable_gradient_checkpointing": True}
        )
        tr = training.prepare_transformer(cfg)
        assert all((b._compiled_call_impl is not None) == compile_ for b in tr.transformer_blocks)
        batch = batch_to_device(CachedDataset(manifest, cfg)[[0, 1]], torch.device("cpu"))
        training.training_step(tr, batch, torch.Generator().manual_seed(0), cfg).backward()
        grads[compile_] = {n: p.grad for n, p in tr.named_parameters() if p.requires_grad}  # names: no _orig_mod.
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-4, atol=1e-6)


def test_report_to_tensorboard_writes_event_files(tmp_path):
    """training.report_to: tensorboard logs the same metrics through accelerate's tracker (when installed)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run_dir, manifest = _tracker_setup(tmp_path, "tensorboard")
    training.train(cfg, run_dir, manifest)
    events = list((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under logs/"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3]


def test_report_to_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg, run_dir, manifest = _tracker_setup(tmp_path, "wandb")
    with pytest.raises(UserError, match="training.report_to: wandb needs the wandb package"):
        training.train(cfg, run_dir, manifest)


def _tracker_setup(tmp_path, report_to):
    manifest = make_cache(tmp_path / "data")
    cfg = make_config(tmp_path, training={"steps": 3, "report_to": report_to}, checkpoints={"interval": None})
    run_dir = tmp_path / "outputs" / "run_20260101_000000"
    run_dir.mkdir(parents=True)
    return cfg, run_dir, manifest


def test_bf16_autocast_on_the_cpu_prints_no_raw_torch_warning(tmp_path, manifest, recwarn):
    """torch warns that a norm cannot use its fused CPU kernel under bf16 autocast: not actionable, reads as failure."""
    cfg = make_config(tmp_path, training={"steps": 1, "mixed_precision_mode": "bf16"}, checkpoints={"interval": None})
    training.train(cfg, tmp_path / "run", manifest)
    assert not [w for w in recwarn if "Mismatch dtype" in str(w.message)]

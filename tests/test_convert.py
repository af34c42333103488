"""convert.py: ComfyUI twins of LoRA and full checkpoints, run conversion, the ltxv-convert CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_export import lora_transformer

from ltxv_tuner import convert, export
from ltxv_tuner.config import validate_config
from ltxv_tuner.errors import UserError
from ltxv_tuner.models import ltxv as models
from ltxv_tuner.models import ltxv_tiny as tiny

ATTN = ["to_k", "to_q", "to_v", "to_out.0"]


def make_cfg(mode="lora", rank=4, alpha=8, targets=ATTN, dtype="fp32"):
    return validate_config(
        {
            "dataset": {"data_folder": "data", "id_token": "SQUISH", "resolution_buckets": [[64, 64, 9]]},
            "model": {"model_source": "tiny", "training_mode": mode},
            "lora": {"rank": rank, "alpha": alpha, "target_modules": list(targets)},
            "checkpoints": {"save_dtype": dtype},
        }
    )


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    cfg = make_cfg(rank=4, alpha=8, targets=[*ATTN, "proj_in", "ff.net.0.proj"])
    t = lora_transformer(cfg)
    path = export.save_lora(tmp_path_factory.mktemp("lora"), t, cfg, 5)
    return path, t


def test_lora_to_comfy_comfy_names_only_factors_as_trained_and_alpha(lora_file, tmp_path):
    src, t = lora_file
    dst = convert.convert_file(src, tmp_path / "out_comfy.safetensors")
    tensors, meta = read(dst)
    assert tensors and all(k.startswith("diffusion_model.") for k in tensors)
    assert "diffusion_model.patchify_proj.lora_A.weight" in tensors  # ComfyUI's name for proj_in ...
    assert not any(".proj_in." in k for k in tensors)  # ... and no diffusers-named copy ComfyUI would not load
    assert not any(".ff.net.0.proj." in k and "transformer_blocks" not in k for k in tensors)
    assert "diffusion_model.transformer_blocks.1.attn2.to_out.0.lora_B.weight" in tensors
    assert "diffusion_model.transformer_blocks.0.ff.net.0.proj.lora_A.weight" in tensors
    sd = t.state_dict()
    a = sd["transformer_blocks.0.attn1.to_q.lora_A.default.weight"]
    b = sd["transformer_blocks.0.attn1.to_q.lora_B.default.weight"]
    assert torch.equal(tensors["diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight"], a)
    assert torch.equal(tensors["diffusion_model.transformer_blocks.0.attn1.to_q.lora_B.weight"], b)  # not folded
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == len(tensors) // 3  # one per module
    assert all(v.dtype == torch.float32 and v.shape == () and v.item() == 8.0 for v in alphas.values())
    # metadata carried over, minus the diffusers alpha (the .alpha tensors hold it for ComfyUI)
    assert meta["ltxv_tuner.id_token"] == "SQUISH" and meta["ltxv_tuner.alpha"] == "8"
    assert export.LORA_ADAPTER_METADATA_KEY not in meta
    assert meta["ltxv_tuner.key_format"] == "comfy"


def test_default_output_name_and_existing_default_refused(lora_file, tmp_path):
    src = tmp_path / "ltxv_lora_step_000005.safetensors"
    src.write_bytes(lora_file[0].read_bytes())
    dst = convert.convert_file(src)
    assert dst == tmp_path / "ltxv_lora_step_000005_comfy.safetensors"
    with pytest.raises(UserError, match="exists already"):
        convert.convert_file(src)


def test_full_to_comfy_original_names_with_prefix(tmp_path):
    cfg = make_cfg(mode="full")
    t = tiny.build_tiny_transformer()
    src = export.save_full(tmp_path, t, cfg, 1)
    tensors, meta = read(convert.convert_file(src))
    assert all(k.startswith("model.diffusion_model.") for k in tensors)
    sd = t.state_dict()
    assert len(tensors) == len(sd)
    for diffusers_name, original_name in [
        ("proj_in.weight", "patchify_proj.weight"),
        ("time_embed.linear.weight", "adaln_single.linear.weight"),
        ("transformer_blocks.0.attn1.norm_q.weight", "transformer_blocks.0.attn1.q_norm.weight"),
        ("transformer_blocks.1.attn2.norm_k.weight", "transformer_blocks.1.attn2.k_norm.weight"),
        ("transformer_blocks.1.ff.net.2.weight", "transformer_blocks.1.ff.net.2.weight"),
        ("scale_shift_table", "scale_shift_table"),
    ]:
        assert torch.equal(tensors["model.diffusion_model." + original_name], sd[diffusers_name])
    assert meta["ltxv_tuner.training_mode"] == "full"


def _make_run(tmp_path, lora_src):
    run = tmp_path / "run_20250101_000000"
    step = run / "checkpoints" / "step_000005"
    (step / "state").mkdir(parents=True)
    lora = step / lora_src.name
    lora.write_bytes(lora_src.read_bytes())
    # accelerate's save_state writes a model.safetensors of the same LoRA weights: it must never be touched
    state_file = step / "state" / "model.safetensors"
    state_file.write_bytes(lora_src.read_bytes())
    save_file({"x": torch.zeros(2)}, str(step / "state" / "optimizer.safetensors"))
    # a checkpoint still being written (training renames .tmp_step_N/ to step_N/ when complete)
    (run / "checkpoints" / ".tmp_step_000010").mkdir()
    (run / "checkpoints" / ".tmp_step_000010" / lora_src.name).write_bytes(lora_src.read_bytes())
    return run, lora, state_file


def test_convert_run_skips_state_and_existing_twins(lora_file, tmp_path):
    run, lora, state_file = _make_run(tmp_path, lora_file[0])
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "checkpoints").rglob("*") if p.is_file()}
    written = convert.convert_run(run).written
    twin = lora.with_name(lora.stem + "_comfy.safetensors")
    assert written == [twin] and twin.is_file()
    assert not list((run / "checkpoints").rglob("state/*_comfy.safetensors"))
    assert not list((run / "checkpoints").rglob(".tmp_step_000010/*_comfy.safetensors"))
    for p, (mtime, data) in before.items():  # sources and state untouched
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    mtime = twin.stat().st_mtime_ns
    again = convert.convert_run(run)
    assert again.written == [] and again.current == [twin]  # second run writes nothing
    assert twin.stat().st_mtime_ns == mtime
    assert not list((run / "checkpoints").rglob("*_comfy_comfy*"))


def test_a_users_diffusers_conversion_in_a_run_is_never_a_source(lora_file, tmp_path, capsys):
    """`convert --to-diffusers` of a twin writes <name>_diffusers.safetensors beside it; converting the run again
    must not take that file as a source (its twin name would be the real twin, which it would overwrite)."""
    run, lora, _ = _make_run(tmp_path, lora_file[0])
    (twin,) = convert.convert_run(run).written
    back = convert.convert_file(twin, to="diffusers")
    assert back == lora.with_name(lora.stem + "_diffusers.safetensors")
    twin_bytes = twin.read_bytes()
    os.utime(back, (twin.stat().st_mtime + 10, twin.stat().st_mtime + 10))  # newer than the twin, as it would be
    result = convert.convert_run(run)
    assert result.written == [] and result.current == [twin] and result.converted_back == [back]
    assert twin.read_bytes() == twin_bytes
    assert not lora.with_name(lora.stem + "_diffusers_comfy.safetensors").exists()
    assert convert.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert f"convert: {run}: 0 ComfyUI twin(s) written, 1 already up to date" in out
    assert "1 *_diffusers file(s) left alone" in out


def test_convert_run_rewrites_a_twin_older_than_its_source(lora_file, tmp_path):
    run, lora, _ = _make_run(tmp_path, lora_file[0])
    twin = lora.with_name(lora.stem + "_comfy.safetensors")
    twin.write_bytes(b"stale")
    os.utime(twin, (1, 1))
    assert convert.convert_run(run).written == [twin]
    assert read(twin)[0]  # a real safetensors file again


def test_convert_run_without_checkpoints_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoints/ folder"):
        convert.convert_run(tmp_path)
    (tmp_path / "checkpoints" / "step_000001" / "state").mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "checkpoints" / "step_000001" / "state" / "model.safetensors"))
    with pytest.raises(UserError, match="no .safetensors weight files"):
        convert.convert_run(tmp_path)


def test_cli_main_converts_and_reports_errors_in_one_line(lora_file, tmp_path, capsys):
    out = tmp_path / "cli_comfy.safetensors"
    assert convert.main([str(lora_file[0]), "--to-comfy", "-o", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert convert.main([str(tmp_path / "missing.safetensors"), "--to-comfy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.safetensors" in err and "\n" not in err and "Traceback" not in err


def test_cli_output_into_a_folder_and_files_readable_by_others(lora_file, tmp_path, capsys):
    """`-o folder/` writes the standard name inside it; weight files get the umask mode (safetensors makes 0600)."""
    folder = tmp_path / "comfy_loras"
    folder.mkdir()
    assert convert.main([str(lora_file[0]), "--to-comfy", "-o", str(folder)]) == 0
    (written,) = folder.iterdir()
    assert written.name == convert.default_output(lora_file[0], "comfy").name
    umask = os.umask(0o022)
    os.umask(umask)
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    capsys.readouterr()
    assert convert.main([str(lora_file[0]), "--to-comfy", "-o", str(blocker / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ltxv-convert: error: {blocker / 'x.safetensors'}: cannot write it") and "\n" not in err


def test_cli_module_entry_point_runs_a_run_folder(lora_file, tmp_path):
    run, lora, _ = _make_run(tmp_path, lora_file[0])
    proc = subprocess.run(
        [sys.executable, "-m", "ltxv_tuner.convert", str(run), "--to-comfy"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert lora.with_name(lora.stem + "_comfy.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# Part 2: every LoRA target, round trips through diffusers, full single-file reload, detection, --to-diffusers

# Every module peft can put a LoRA on in LTXV is an nn.Linear (norm_q/norm_k are RMSNorm, time_embed is a container,
# scale_shift_table a parameter: peft refuses them). `linear_1`/`linear_2` hit time_embed's timestep embedder and the
# caption projection, `linear` is time_embed.linear.
ALL_LINEAR = [*ATTN, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "linear_1", "linear_2", "linear"]


def forward_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 8, 128, generator=g),
        encoder_hidden_states=torch.randn(1, 6, tiny.TINY_TEXT_DIM, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_attention_mask=torch.ones(1, 6),
        num_frames=2,
        height=2,
        width=2,
        return_dict=False,
    )


def run_transformer(t):
    with torch.no_grad():
        return t.eval()(**forward_inputs())[0]


@pytest.fixture(scope="module")
def pipeline_parts():
    return dict(
        scheduler=models.build_scheduler(),
        vae=tiny.build_tiny_vae(),
        text_encoder=tiny.build_tiny_text_encoder(),
        tokenizer=tiny.build_tiny_tokenizer(),
    )


def diffusers_output(parts, lora_path):
    """Load the file the way a diffusers user would: LTXPipeline.load_lora_weights on a fresh base."""
    from diffusers import LTXPipeline

    pipe = LTXPipeline(transformer=tiny.build_tiny_transformer(), **parts)
    pipe.load_lora_weights(str(lora_path))
    return run_transformer(pipe.transformer)


def assert_rel_close(out, ref, tol=1e-5):
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= tol, f"relative difference {rel:.2e} > {tol}"


def lora_module_names(tensors, prefix):
    return {convert._split_lora_key(k)[0].removeprefix(prefix) for k in tensors}


def test_every_linear_target_gets_comfy_names(tmp_path):
    cfg = make_cfg(targets=ALL_LINEAR)
    t = lora_transformer(cfg)
    tensors, _ = read(convert.convert_file(export.save_lora(tmp_path, t, cfg, 1)))
    linear = {n for n, m in tiny.build_tiny_transformer().named_modules() if isinstance(m, torch.nn.Linear)}
    comfy_names = {convert.keys.diffusers_to_original(n) for n in linear}
    renamed = {n for n in linear if convert.keys.diffusers_to_original(n) != n}
    assert renamed == {
        "proj_in",
        "time_embed.linear",
        "time_embed.emb.timestep_embedder.linear_1",
        "time_embed.emb.timestep_embedder.linear_2",
    }
    modules = lora_module_names(tensors, "diffusion_model.")
    assert modules == comfy_names  # every Linear of LTXV under its ComfyUI name, and under no other name
    assert not modules & renamed
    assert not comfy_keys_dropped(tensors)
    for name in [
        "patchify_proj",
        "proj_out",
        "adaln_single.linear",
        "adaln_single.emb.timestep_embedder.linear_1",
        "adaln_single.emb.timestep_embedder.linear_2",
        "caption_projection.linear_1",
        "caption_projection.linear_2",
        "transformer_blocks.1.attn2.to_v",
        "transformer_blocks.0.ff.net.2",
    ]:
        assert name in modules


@pytest.mark.parametrize("alpha_factor", [1, 2])
@pytest.mark.parametrize("targets", [ATTN, [*ATTN, "ff.net.0.proj", "ff.net.2"], ALL_LINEAR], ids=["attn", "ff", "all"])
def test_round_trip_through_diffusers_and_comfyui_semantics(pipeline_parts, tmp_path, alpha_factor, targets):
    rank = 4
    cfg = make_cfg(rank=rank, alpha=alpha_factor * rank, targets=targets)
    trained = lora_transformer(cfg)
    ref = run_transformer(trained)
    base = run_transformer(tiny.build_tiny_transformer())
    assert (ref - base).abs().max() > 1e-3  # the LoRA really changes the output

    src = export.save_lora(tmp_path, trained, cfg, 1)
    assert_rel_close(diffusers_output(pipeline_parts, src), ref)
    twin = convert.convert_file(src)
    # The twin applied the way ComfyUI applies a LoRA gives the trained outputs, whatever the targets
    assert_rel_close(run_transformer(comfy_patched(read(twin)[0])), ref)
    # ... and the twin converted back loads exactly in diffusers
    back = convert.convert_file(twin, to="diffusers")
    assert_rel_close(diffusers_output(pipeline_parts, back), ref)
    adapter = json.loads(read(back)[1][export.LORA_ADAPTER_METADATA_KEY])
    assert adapter["transformer.r"] == rank and adapter["transformer.lora_alpha"] == alpha_factor * rank


# ComfyUI's LoRA application, as its code does it (comfy/lora.py model_lora_keys_unet + load_lora,
# comfy/weight_adapter/lora.py calculate_weight; read from ComfyUI a125cd84): a key `diffusion_model.<name>` of the
# file patches the model weight `diffusion_model.<name>.weight` (LTXV's model uses Lightricks' original names);
# weight += (alpha / rank if a `.alpha` tensor is there, else 1.0) * (lora_B @ lora_A) in float32. Every other key
# is logged as "lora key not loaded". The real ComfyUI check (../shared/comfy_check) agrees on our twins.


def comfy_keys_dropped(tensors):
    """The keys of a LoRA file for the tiny LTXV that ComfyUI's LTXV key map would not load."""
    names = [n for n, _ in tiny.build_tiny_transformer().named_parameters() if n.endswith(".weight")]
    weights = {convert.keys.diffusers_to_original(n.removesuffix(".weight")) for n in names}
    consumed = set()
    for name in weights:
        if f"diffusion_model.{name}.lora_B.weight" in tensors:
            consumed |= {f"diffusion_model.{name}.{part}" for part in ("lora_A.weight", "lora_B.weight", "alpha")}
    return sorted(set(tensors) - consumed)


def comfy_update(tensors, name):
    """The weight update ComfyUI adds for module `name` (original naming) at strength 1."""
    a = tensors[f"diffusion_model.{name}.lora_A.weight"].float()
    b = tensors[f"diffusion_model.{name}.lora_B.weight"].float()
    alpha = tensors.get(f"diffusion_model.{name}.alpha")
    scale = alpha.item() / a.shape[0] if alpha is not None else 1.0
    return scale * (b @ a)


def comfy_patched(tensors):
    """A fresh tiny base with every module the file patches updated the ComfyUI way."""
    model = tiny.build_tiny_transformer()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key in tensors:
            if key.endswith(".lora_B.weight"):
                name = key.removeprefix("diffusion_model.").removesuffix(".lora_B.weight")
                modules[convert.keys.original_to_diffusers(name)].weight += comfy_update(tensors, name)
    return model


DONE_WHEN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]


def test_bf16_twin_loses_nothing_beyond_the_save_dtype_and_comfyui_drops_no_key(tmp_path):
    """Rank 6, alpha 8 (alpha/rank not a power of two), saved bf16: every key of the twin is one ComfyUI's LTXV map
    consumes, and its update differs from the fp32 training state by no more than the diffusers file's own bf16
    rounding does (folding alpha/rank into a bf16 lora_B would round a second time)."""
    cfg = make_cfg(rank=6, alpha=8, targets=DONE_WHEN_TARGETS, dtype="bf16")
    trained = lora_transformer(cfg)
    src = export.save_lora(tmp_path, trained, cfg, 1)
    diffusers_file = read(src)[0]
    twin = read(convert.convert_file(src))[0]
    assert not comfy_keys_dropped(twin)
    assert {k for k in twin if not k.endswith(".alpha")} == {  # every trained module, no copies
        "diffusion_model." + convert.keys.diffusers_to_original(k.removeprefix("transformer.")) for k in diffusers_file
    }
    modules = dict(trained.named_modules())
    for key in (k for k in diffusers_file if k.endswith(".lora_B.weight")):
        name = key.removeprefix("transformer.").removesuffix(".lora_B.weight")
        mod = modules[name]
        fp32 = (8 / 6) * (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach()
        a, b = diffusers_file[f"transformer.{name}.lora_A.weight"], diffusers_file[key]
        assert a.dtype == b.dtype == torch.bfloat16
        diffusers_err = ((8 / 6) * (b.float() @ a.float()) - fp32).abs().max()
        twin_err = (comfy_update(twin, convert.keys.diffusers_to_original(name)) - fp32).abs().max()
        assert diffusers_err > 0 and twin_err <= diffusers_err * (1 + 1e-6), (name, twin_err, diffusers_err)


def test_full_twin_reloads_with_from_single_file_exactly(tmp_path):
    from diffusers import LTXVideoTransformer3DModel

    cfg = make_cfg(mode="full", dtype="fp32")
    trained = tiny.build_tiny_transformer()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    trained.save_config(tmp_path / "pipe" / "transformer")
    twin = convert.convert_file(export.save_full(tmp_path, trained, cfg, 2))
    assert twin.name == "ltxv_transformer_step_000002_comfy.safetensors"
    loaded = LTXVideoTransformer3DModel.from_single_file(
        str(twin), config=str(tmp_path / "pipe"), subfolder="transformer", local_files_only=True
    )
    want, got = trained.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_full_twin_without_a_base_file_gets_a_lightricks_config(tmp_path):
    """ComfyUI's checkpoint loader sizes an LTXV model from the `config` metadata (else it assumes 32 heads): a twin
    of a model that came from no Lightricks file (tiny: 2 heads of 16) gets one made from its transformer config."""
    src = export.save_full(tmp_path, tiny.build_tiny_transformer(), make_cfg(mode="full"), 1)
    _, meta = read(convert.convert_file(src))
    section = json.loads(meta["config"])["transformer"]
    assert {k: section[k] for k in ("num_attention_heads", "attention_head_dim", "num_layers")} == {
        "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2}  # fmt: skip
    assert (section["cross_attention_dim"], section["caption_channels"], section["in_channels"]) == (32, 32, 128)


def test_full_twin_carries_base_config_metadata(tmp_path):
    src = export.save_full(tmp_path, tiny.build_tiny_transformer(), make_cfg(mode="full"), 1)
    config = '{"transformer": {"num_layers": 2}}'
    _, meta = read(convert.convert_file(src, base_metadata={"config": config}))
    assert meta["config"] == config and meta["ltxv_tuner.training_mode"] == "full"


def test_convert_run_carries_base_metadata_for_full_checkpoints(tmp_path, monkeypatch):
    from ltxv_tuner.models import ltxv as models

    cfg = make_cfg(mode="full")
    run = tmp_path / "run"
    (run / "config.yaml").parent.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    src = export.save_full(run / "checkpoints" / "step_000001", tiny.build_tiny_transformer(), cfg, 1)
    seen = []

    def fake_base_metadata(model_cfg):  # the base model's loader is not what is tested here
        seen.append(model_cfg.model_source)
        return {"config": '{"x": 1}'}

    monkeypatch.setattr(models, "base_checkpoint_metadata", fake_base_metadata)
    (twin,) = convert.convert_run(run).written
    assert seen == ["tiny"] and read(twin)[1]["config"] == '{"x": 1}'
    assert twin == src.with_name(src.stem + "_comfy.safetensors")


def test_comfy_files_are_recognised_and_not_converted_again(lora_file, tmp_path, capsys):
    twin = convert.convert_file(lora_file[0], tmp_path / "a_comfy.safetensors")
    with pytest.raises(convert.AlreadyConverted, match="already in ComfyUI form"):
        convert.convert_file(twin, tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()
    assert convert.main([str(twin), "--to-comfy"]) == 1
    err = capsys.readouterr().err.strip()
    assert "already in ComfyUI form" in err and "\n" not in err
    # a file in ComfyUI form under a name without _comfy gets no twin in a run either
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "imported_lora.safetensors").write_bytes(twin.read_bytes())
    result = convert.convert_run(run)
    assert result.written == [] and result.comfy_sources == [run / "checkpoints" / "imported_lora.safetensors"]


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 4)}, "not LTXV transformer LoRA keys"),
        ({"encoder.conv_in.weight": torch.zeros(2, 2)}, "neither an LTXV LoRA nor an LTXV transformer"),
        ({"transformer.foo.lora_A.weight": torch.zeros(2, 4)}, "not LTXV transformer LoRA keys"),
        # a Stable Diffusion kohya LoRA: lora_unet_ like an LTXV one, but UNet modules (was "already ComfyUI form")
        (
            {
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2),
            },
            "not LTXV transformer LoRA keys",
        ),
    ],
)
def test_foreign_files_get_a_clear_message(tmp_path, capsys, tensors, match):
    path = tmp_path / "foreign.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UserError, match=match):
        convert.convert_file(path)
    assert convert.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "foreign.safetensors" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == [path]


def test_non_safetensors_and_incomplete_lora(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"junk")
    with pytest.raises(UserError, match="only .safetensors"):
        convert.convert_file(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="not a readable safetensors"):
        convert.convert_file(junk)
    half = tmp_path / "half.safetensors"
    save_file({"diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32)}, str(half))
    with pytest.raises(UserError, match="no lora_B"):
        convert.convert_file(half, to="diffusers")


def _comfy_lora_by_hand(trained, rank, alpha, kohya=False):
    """A ComfyUI-style LoRA as other tools write it: original names, raw lora_B, `.alpha` tensors."""
    out = {}
    for name, mod in trained.named_modules():
        if not hasattr(mod, "lora_A"):
            continue
        original = convert.keys.diffusers_to_original(name)
        a, b = mod.lora_A["default"].weight.detach().clone(), mod.lora_B["default"].weight.detach().clone()
        if kohya:
            key = "lora_unet_" + original.replace(".", "_")
            out |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b}
        else:
            key = "diffusion_model." + original
            out |= {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


@pytest.mark.parametrize("form", ["comfy_alpha", "comfy_no_alpha", "kohya"])
def test_to_diffusers_from_comfy_and_kohya_loras(pipeline_parts, tmp_path, form):
    rank, alpha = 4, 8
    with_alpha = form != "comfy_no_alpha"
    cfg = make_cfg(rank=rank, alpha=alpha if with_alpha else rank, targets=ALL_LINEAR)
    trained = lora_transformer(cfg)
    ref = run_transformer(trained)
    src = tmp_path / f"{form}.safetensors"
    save_file(_comfy_lora_by_hand(trained, rank, alpha if with_alpha else None, kohya=form == "kohya"), str(src))
    assert convert.main([str(src), "--to-diffusers"]) == 0
    out = tmp_path / f"{form}_diffusers.safetensors"
    tensors, meta = read(out)
    assert all(k.startswith("transformer.") for k in tensors)
    assert "transformer.proj_in.lora_A.weight" in tensors and "transformer.time_embed.linear.lora_B.weight" in tensors
    assert not any(k.endswith(".alpha") for k in tensors)
    adapter = json.loads(meta[export.LORA_ADAPTER_METADATA_KEY])
    assert adapter["transformer.r"] == rank
    assert adapter["transformer.lora_alpha"] == (alpha if with_alpha else rank)
    assert_rel_close(diffusers_output(pipeline_parts, out), ref)


def test_to_diffusers_mixed_alphas_fold_into_lora_b(pipeline_parts, tmp_path):
    cfg = make_cfg(rank=4, alpha=4, targets=ATTN)
    trained = lora_transformer(cfg)
    tensors = _comfy_lora_by_hand(trained, 4, None)
    tensors["diffusion_model.transformer_blocks.0.attn1.to_q.alpha"] = torch.tensor(12.0)  # 3x on one module
    with torch.no_grad():
        trained.transformer_blocks[0].attn1.to_q.lora_B["default"].weight.mul_(3.0)
    src = tmp_path / "mixed.safetensors"
    save_file(tensors, str(src))
    out = convert.convert_file(src, to="diffusers")
    assert export.LORA_ADAPTER_METADATA_KEY not in read(out)[1]
    assert_rel_close(diffusers_output(pipeline_parts, out), run_transformer(trained))


def test_to_diffusers_full_original_checkpoint(tmp_path):
    t = tiny.build_tiny_transformer()
    sd = t.state_dict()
    original = {"model.diffusion_model." + convert.keys.diffusers_to_original(k): v for k, v in sd.items()}
    original["vae.decoder.conv_in.weight"] = torch.zeros(3)  # a whole single file also carries the VAE
    src = tmp_path / "ltxv-single-file.safetensors"
    save_file(original, str(src), metadata={"config": "{}"})
    out = convert.convert_file(src, to="diffusers")
    tensors, meta = read(out)
    assert set(tensors) == set(sd) and all(torch.equal(tensors[k], sd[k]) for k in sd)
    assert meta["config"] == "{}"
    with pytest.raises(convert.AlreadyConverted, match="already in diffusers form"):
        convert.convert_file(out, to="diffusers")


def test_save_dtype_option(lora_file, tmp_path):
    out = tmp_path / "half_comfy.safetensors"
    assert convert.main([str(lora_file[0]), "-o", str(out), "--save-dtype", "bf16"]) == 0
    tensors, _ = read(out)
    src_b = read(lora_file[0])[0]["transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"]
    factors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    assert {v.dtype for v in factors.values()} == {torch.bfloat16}
    assert torch.equal(tensors["diffusion_model.transformer_blocks.0.attn1.to_q.lora_B.weight"], src_b.bfloat16())
    assert {v.dtype for k, v in tensors.items() if k.endswith(".alpha")} == {torch.float32}

"""End to end as a user runs it: `python train.py CONFIG` on the bundled tiny model and example clips."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from conftest import REPO, run_cli
from safetensors import safe_open


def _weights(run_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in (run_dir / "checkpoints").rglob("*.safetensors")
        if "state" not in p.relative_to(run_dir).parts and not p.stem.endswith("_comfy")
    )


def _runs(output_dir: Path) -> list[Path]:
    return sorted(p for p in output_dir.iterdir() if p.name.startswith("run_"))


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_quickstart_lora_end_to_end_then_rerun_reuses_cache(quickstart_config: Path, tmp_path: Path):
    out = tmp_path / "outputs"
    r = run_cli(str(quickstart_config))
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = _runs(out)
    assert (run / "config.yaml").is_file()
    assert (run / "logs" / "train.log").stat().st_size > 0
    weights = _weights(run)
    assert len(weights) >= 2, weights
    for w in weights:
        twin = w.with_name(w.stem + "_comfy.safetensors")
        assert twin.is_file(), f"no ComfyUI twin for {w}"
        keys = _keys(twin)
        assert keys and all(k.startswith("diffusion_model.") for k in keys)
        assert not any("proj_in" in k or "norm_q" in k for k in keys)  # ComfyUI names only
        assert any(k.endswith("attn1.to_q.lora_A.weight") for k in keys)
        assert {k.rsplit(".", 1)[0] for k in keys if k.endswith(".alpha")} == {
            k.removesuffix(".lora_A.weight") for k in keys if k.endswith(".lora_A.weight")
        }  # the strength for ComfyUI: one .alpha per module

    r2 = run_cli(str(quickstart_config))
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert len(_runs(out)) == 2
    assert "reuse" in (r2.stdout + r2.stderr).lower()


def test_quickstart_full_finetune(quickstart_config: Path, tmp_path: Path):
    r = run_cli(str(quickstart_config), "model.training_mode=full", "training.steps=2", "checkpoints.interval=1")
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = _runs(tmp_path / "outputs")
    weights = _weights(run)
    assert len(weights) == 2
    twin = weights[-1].with_name(weights[-1].stem + "_comfy.safetensors")
    keys = _keys(twin)
    assert all(k.startswith("model.diffusion_model.") for k in keys)
    assert "model.diffusion_model.patchify_proj.weight" in keys
    assert "model.diffusion_model.adaln_single.linear.weight" in keys


# train.py as a user runs it, then the heavy packages the process imported (printed at exit).
IMPORTS_PROBE = (
    "import atexit, runpy, sys; atexit.register(lambda: print('IMPORTED', sorted({m.split('.')[0] for m in "
    "sys.modules} & {'torch', 'diffusers', 'transformers', 'accelerate'}))); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_only_stages_and_convert_existing_run(quickstart_config: Path, tmp_path: Path):
    r = run_cli(str(quickstart_config), "--only", "preprocess")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "outputs").exists()  # preprocessing alone makes no run folder
    # Nothing to do: no model code is loaded, and with a CPU-only torch not even torch.
    cmd = [sys.executable, "-c", IMPORTS_PROBE, str(REPO / "train.py"), str(quickstart_config), "--only", "preprocess"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0 and "cache reused, nothing to encode (4 clip(s)" in r.stdout + r.stderr, r.stderr
    imported = r.stdout.split("IMPORTED")[-1]
    assert "diffusers" not in imported and "transformers" not in imported and "accelerate" not in imported
    if torch.version.cuda is None and torch.version.hip is None:
        assert imported.strip() == "[]", imported
    r = run_cli(str(quickstart_config), "--only", "train", "training.steps=1", "checkpoints.interval=null")
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = _runs(tmp_path / "outputs")
    (w,) = _weights(run)
    assert not w.with_name(w.stem + "_comfy.safetensors").exists()  # --only train does not convert
    r = run_cli(str(quickstart_config), "--only", "convert", "--run-dir", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    assert w.with_name(w.stem + "_comfy.safetensors").is_file()


def test_real_config_fails_fast_with_one_line(tmp_path: Path):
    start = time.time()
    r = run_cli(str(REPO / "configs" / "unified_training_config.yaml"), cwd=tmp_path)
    assert r.returncode != 0
    assert time.time() - start < 60
    assert "Traceback" not in r.stderr + r.stdout
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "data/videos" in err[0], r.stderr


def test_misspelled_key_on_the_command_line(quickstart_config: Path):
    r = run_cli(str(quickstart_config), "training.stpes=3")
    assert r.returncode == 2
    assert "training.stpes: unknown key (did you mean training.steps?)" in r.stderr
    assert "Traceback" not in r.stderr


def test_misspelled_key_in_the_yaml(tmp_path: Path, quickstart_config: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(quickstart_config.read_text().replace("learning_rate:", "learning_rte:"))
    r = run_cli(str(bad))
    assert r.returncode == 2
    assert "training.learning_rte: unknown key (did you mean training.learning_rate?)" in r.stderr


def test_resume_target_missing_is_an_error(quickstart_config: Path, tmp_path: Path):
    r = run_cli(str(quickstart_config), "--resume", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such run folder" in r.stderr
    r = run_cli(str(quickstart_config), "--resume", "latest")
    assert r.returncode == 2 and "no run with a checkpoint" in r.stderr


def test_train_sh_without_arguments_prints_usage():
    r = subprocess.run(["bash", str(REPO / "train.sh")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "usage: ./train.sh CONFIG.yaml" in r.stdout


def test_resume_latest_continues_the_same_run(quickstart_config: Path, tmp_path: Path):
    out = tmp_path / "outputs"
    r = run_cli(str(quickstart_config), "training.steps=4", "checkpoints.interval=2")
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = _runs(out)
    config_before = (run / "config.yaml").read_text()

    # A resume that changes what the checkpoint means is refused, and the run folder is left as it was.
    more = ("training.steps=6", "checkpoints.interval=2")
    r = run_cli(str(quickstart_config), *more, "lora.rank=4", "--resume", "latest")
    assert r.returncode == 2
    assert "lora.rank: 8 -> 4" in r.stderr and "Traceback" not in r.stderr
    assert (run / "config.yaml").read_text() == config_before

    r = run_cli(str(quickstart_config), *more, "--resume", "latest")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _runs(out) == [run]  # same run folder, no new one
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_000002", "step_000004", "step_000006"]
    logged = [json.loads(line)["step"] for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["steps"] == 6
    for w in _weights(run):
        assert w.with_name(w.stem + "_comfy.safetensors").is_file()


def test_output_dir_that_is_a_file_fails_before_preprocessing(quickstart_config: Path, tmp_path: Path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    r = run_cli(str(quickstart_config), f"output_dir={blocker / 'sub'}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "unexpected" not in r.stderr
    assert f"output_dir: cannot create run folders in {blocker / 'sub'} ({blocker} is a file" in r.stderr
    assert "stage 1/3" not in r.stdout  # nothing encoded for a run that cannot be saved


def test_data_folder_where_the_cache_cannot_be_written(quickstart_config: Path, quickstart_dir: Path):
    (quickstart_dir / ".precomputed").write_text("")  # stands in for a read-only folder (tests may run as root)
    r = run_cli(str(quickstart_config), "--only", "preprocess")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "unexpected" not in r.stderr
    assert f"dataset.data_folder: cannot write the cache {quickstart_dir / '.precomputed'}" in r.stderr


def test_convert_on_a_folder_that_is_not_a_run_writes_nothing_into_it(quickstart_config: Path, quickstart_dir: Path):
    before = sorted(p.name for p in quickstart_dir.iterdir())
    r = run_cli(str(quickstart_config), "--only", "convert", "--run-dir", str(quickstart_dir))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{quickstart_dir}: no checkpoints/ folder" in r.stderr
    assert sorted(p.name for p in quickstart_dir.iterdir()) == before  # no logs/ left in the data folder
    r = run_cli(str(quickstart_config), "--only", "convert", "--run-dir", str(quickstart_dir / "sunset.txt"))
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr, r.stderr


def test_resume_with_fewer_steps_than_the_run_has_is_refused(quickstart_config: Path, tmp_path: Path):
    r = run_cli(str(quickstart_config), "training.steps=2", "checkpoints.interval=null")
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = _runs(tmp_path / "outputs")
    config_before = (run / "config.yaml").read_text()
    r = run_cli(str(quickstart_config), "training.steps=1", "--resume", "latest")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "step_000002 is at step 2, past training.steps=1; pass training.steps=2" in r.stderr
    assert (run / "config.yaml").read_text() == config_before  # the run's record still says 2 steps
    r = run_cli(str(quickstart_config), "training.steps=2", "--resume", "latest")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing to train" in r.stdout


def test_a_bad_resume_target_is_refused_before_preprocessing(quickstart_config: Path, tmp_path: Path):
    r = run_cli(str(quickstart_config), "--resume", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such run folder" in r.stderr
    assert "stage 1/3" not in r.stdout  # no encoding for a run that cannot start


def test_a_missing_validation_image_is_reported_before_any_work(quickstart_config: Path, tmp_path: Path):
    missing = tmp_path / "first_frame.png"
    r = run_cli(
        str(quickstart_config),
        "validation.interval=1",
        "validation.prompts=[a cat]",
        f"validation.images=[{missing}]",
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"validation.images[0]: cannot read {missing}" in r.stderr
    assert "stage 1/3" not in r.stdout and not (tmp_path / "outputs").exists()


def test_output_dir_with_a_tilde_is_the_home_folder(quickstart_config: Path, tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    r = run_cli(str(quickstart_config), "output_dir=~/runs", "training.steps=1", cwd=tmp_path, env={"HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(_runs(home / "runs")) == 1
    assert not (tmp_path / "~").exists()  # not a folder literally named ~ in the current folder


def test_a_local_model_file_that_is_not_ltxv_fails_before_any_download(quickstart_config: Path, tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    bogus = tmp_path / "not_ltxv.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(bogus))
    r = run_cli(str(quickstart_config), f"model.model_source={bogus}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(bogus) in r.stderr and "Hugging Face" not in r.stderr
    assert "== stage 1/3" not in r.stdout  # refused before preprocessing


def test_warnings_and_the_run_log_tell_the_whole_story(quickstart_config: Path, quickstart_dir: Path, tmp_path: Path):
    (quickstart_dir / "broken.mp4").write_bytes(b"not a video")
    (quickstart_dir / "broken.txt").write_text("a caption")
    r = run_cli(
        str(quickstart_config),
        "training.steps=1",
        "checkpoints.interval=null",
        "validation.interval=10",
        "validation.prompts=[a cat]",
        "training.batch_size=3",
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "warning: validation.interval 10 > training.steps 1" in out
    # the bundled data has 2 clips per bucket: batches of 3 cannot be filled
    assert "warning: bucket 128x96x17 has 2 clip(s), not a multiple of training.batch_size 3" in out
    assert "\r" not in out  # output to a pipe: no progress-bar fragments
    (run,) = _runs(tmp_path / "outputs")
    log = (run / "logs" / "train.log").read_text()
    # Logged before the run folder existed, yet in its log: the preflight and the preprocessing report with skips.
    for line in ("INFO preflight: bucket 128x96x17: 36 tokens", "INFO preprocess: 4 clip(s) ready",
                 "bucket 128x96x17: 2 clip(s): red_ball.mp4, stripes.mkv", "skipped 1:", "broken.mp4: not a readable",
                 "WARNING validation.interval 10 > training.steps 1", "INFO training done: step 1",
                 f"INFO convert: {run}: 1 ComfyUI twin(s) written", "== done =="):  # fmt: skip
        assert line in log, line
    assert "WARNING warning" not in log
    assert not (run / "validation").exists()  # no video was due: no empty folder


def test_an_unexpected_error_is_reported_in_the_run_folder(
    quickstart_config: Path, tmp_path: Path, monkeypatch, capsys
):
    from ltxv_tuner import cli, pipeline

    def broken_stage(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "stage_train", broken_stage)
    assert cli.main([str(quickstart_config)]) == 1
    err = capsys.readouterr().err
    (run,) = _runs(tmp_path / "outputs")
    (crash,) = (run / "logs").glob("crash_*.txt")
    assert "RuntimeError: boom" in crash.read_text() and str(crash) in err
    assert "ERROR error: unexpected RuntimeError: boom" in (run / "logs" / "train.log").read_text()


def test_only_convert_picks_the_newest_run_with_a_checkpoint(quickstart_config: Path, tmp_path: Path):
    r = run_cli(
        str(quickstart_config),
        "training.steps=1",
        "checkpoints.interval=null",
        "checkpoints.auto_convert_to_comfy=false",
    )
    assert r.returncode == 0, r.stderr
    (run,) = _runs(tmp_path / "outputs")
    (tmp_path / "outputs" / "run_29990101_000000" / "checkpoints").mkdir(
        parents=True
    )  # newer, killed before a checkpoint
    r = run_cli(str(quickstart_config), "--only", "convert")
    assert r.returncode == 0, r.stderr
    (w,) = _weights(run)
    assert w.with_name(w.stem + "_comfy.safetensors").is_file()


def _save_tiny_diffusers_folder(path: Path) -> Path:
    """A diffusers-layout LTXV folder (transformer/, vae/, text_encoder/, tokenizer/, scheduler/) of the tiny parts."""
    from diffusers import LTXPipeline

    from ltxv_tuner.models import ltxv as models
    from ltxv_tuner.models import ltxv_tiny as tiny

    LTXPipeline(
        scheduler=models.build_scheduler(),
        vae=tiny.build_tiny_vae(),
        text_encoder=tiny.build_tiny_text_encoder(),
        tokenizer=tiny.build_tiny_tokenizer(),
        transformer=tiny.build_tiny_transformer(),
    ).save_pretrained(str(path))
    return path


def test_diffusers_folder_then_own_full_finetune_as_base(quickstart_config: Path, tmp_path: Path):
    """Real loading paths end to end: a local diffusers folder as the base, then the full fine-tune this tool wrote
    (a transformer-only single file) as the base of a LoRA run, with VAE and T5 taken from the folder."""
    folder = _save_tiny_diffusers_folder(tmp_path / "ltxv_folder")
    out = tmp_path / "outputs"
    r = run_cli(
        str(quickstart_config),
        f"model.model_source={folder}",
        "model.training_mode=full",
        "training.steps=2",
        "checkpoints.interval=null",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (full_run,) = _runs(out)
    (full,) = _weights(full_run)
    assert full.name == "ltxv_transformer_step_000002.safetensors"

    r = run_cli(
        str(quickstart_config),
        f"model.model_source={full}",
        f"model.vae={folder}",
        f"model.text_encoder={folder}",
        "training.steps=2",
        "checkpoints.interval=null",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reuse" in r.stdout  # same VAE and text encoder as before: the cache is shared
    lora_run = next(p for p in _runs(out) if p != full_run)
    (lora,) = _weights(lora_run)
    twin = lora.with_name(lora.stem + "_comfy.safetensors")
    assert twin.is_file() and all(k.startswith("diffusion_model.") for k in _keys(twin))
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ltxv_tuner.base_model"] == str(full)


def test_named_version_from_the_hf_cache_end_to_end(quickstart_config: Path, tmp_path: Path):
    """`model_source: LTXV_2B_0.9.5` as a user writes it, served offline from a Hugging Face cache laid out as
    huggingface_hub writes it: the Lightricks single file (transformer + 0.9.5 VAE, original key layout) and the
    repo's text_encoder/ + tokenizer/. All three stages run through the real download/loading code."""
    from test_models import _metadata, _populate_hub_cache, _small_vae, _write_single_file

    from ltxv_tuner.models import ltxv_tiny as tiny

    vae = _small_vae()
    single = _write_single_file(
        tmp_path / "ltx-video-2b-v0.9.5.safetensors",
        tiny.build_tiny_transformer(),
        vae,
        _metadata(vae, tiny.TINY_TRANSFORMER_CONFIG),
    )
    folder = _save_tiny_diffusers_folder(tmp_path / "repo_parts")
    files = {"ltx-video-2b-v0.9.5.safetensors": single}
    for sub in ("text_encoder", "tokenizer"):
        files |= {f"{sub}/{p.name}": p for p in (folder / sub).iterdir()}
    hf_home = tmp_path / "hf_home"
    _populate_hub_cache(hf_home / "hub", "Lightricks/LTX-Video", files)

    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    r = run_cli(str(quickstart_config), "model.model_source=LTXV_2B_0.9.5", "training.steps=2", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = _runs(tmp_path / "outputs")
    weights = _weights(run)
    assert weights and all(w.with_name(w.stem + "_comfy.safetensors").is_file() for w in weights)
    with safe_open(str(weights[-1]), "pt") as f:
        assert f.metadata()["ltxv_tuner.base_model"] == "LTXV_2B_0.9.5"

    # The same name with an empty cache and no network: one line naming what it tried to get.
    r = run_cli(str(quickstart_config), "model.model_source=LTXV_2B_0.9.5", env={**env, "HF_HOME": str(tmp_path / "x")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "ltx-video-2b-v0.9.5.safetensors" in r.stderr and "Lightricks/LTX-Video" in r.stderr

"""Exact resume: a checkpoint is the whole training state (weights, optimizer, scheduler, RNG, data position)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training import make_cache, make_config, trainable_from_checkpoint

from ltxv_tuner import checkpoints, pipeline, training
from ltxv_tuner.config import load_config
from ltxv_tuner.errors import UserError

BUCKETS = ((64, 64, 9), (96, 64, 17))

# Everything that could make a resumed run drift: batches of 2 over two buckets (data order), warmup
# (scheduler state), dropout (global RNG), image-to-video draws and noise (per-step generators), clipping.
HARD = {
    "training": {
        "batch_size": 2,
        "warmup_steps": 2,
        "scheduler_type": "constant",
        "first_frame_conditioning_p": 0.5,
        "max_grad_norm": 0.05,
        "weight_decay": 0.1,
        "mixed_precision_mode": "bf16",
    },
    "lora": {"dropout": 0.1},
    "checkpoints": {"interval": 3},
}


def _cfg(tmp_path: Path, steps: int, **extra):
    sections = {k: dict(v) for k, v in HARD.items()}
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    sections["training"]["steps"] = steps
    return make_config(tmp_path, buckets=BUCKETS, **sections)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return make_cache(tmp_path / "data", buckets=BUCKETS, clips_per_bucket=3)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_three_plus_three_steps_equal_six_straight(tmp_path, manifest):
    straight = tmp_path / "straight"
    training.train(_cfg(tmp_path, 6), straight, manifest)

    resumed = tmp_path / "resumed"
    first = training.train(_cfg(tmp_path, 3), resumed, manifest)
    assert first.final_step == 3
    result = training.train(_cfg(tmp_path, 6), resumed, manifest, resume_from=resumed)

    assert result.final_step == 6
    assert [p.parent.name for p in result.checkpoints] == ["step_000003", "step_000006"]
    _assert_same_weights(
        trainable_from_checkpoint(straight / "checkpoints" / "step_000006"),
        trainable_from_checkpoint(resumed / "checkpoints" / "step_000006"),
    )
    a, b = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    state = json.loads((resumed / "checkpoints/step_000006/state/training_state.json").read_text())
    assert state["step"] == 6 and state["data_position"] == 6
    log = (resumed / "logs" / "train.log").read_text()
    assert "resumed from" in log and "step_000003" in log


def test_resume_continues_pruning_across_runs(tmp_path, manifest):
    run = tmp_path / "run"
    training.train(_cfg(tmp_path, 4, checkpoints={"interval": 1, "keep_last_n": 2}), run, manifest)
    training.train(_cfg(tmp_path, 6, checkpoints={"interval": 1, "keep_last_n": 2}), run, manifest, resume_from=run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000005", "step_000006"]


def test_resume_with_changed_lora_settings_says_what_differs(tmp_path, manifest):
    run = tmp_path / "run"
    training.train(_cfg(tmp_path, 3), run, manifest)
    changed = _cfg(tmp_path, 6, lora={"rank": 8, "target_modules": ["to_q"]})
    with pytest.raises(UserError, match=r"lora\.rank: 4 -> 8.*lora\.target_modules"):
        training.train(changed, run, manifest, resume_from=run)
    assert checkpoints.latest_checkpoint(run).name == "step_000003"  # nothing was overwritten


def test_resume_target_missing_or_empty_is_an_error_never_a_fresh_start(tmp_path, manifest):
    with pytest.raises(UserError, match="does not exist"):
        training.train(_cfg(tmp_path, 3), tmp_path / "run", manifest, resume_from=tmp_path / "nope")
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no complete checkpoint"):
        training.train(_cfg(tmp_path, 3), empty, manifest, resume_from=empty)
    assert not (empty / "checkpoints" / "step_000001").exists()


def test_half_written_checkpoints_are_never_the_latest(tmp_path, manifest):
    run = tmp_path / "run"
    training.train(_cfg(tmp_path, 3), run, manifest)
    (run / "checkpoints" / ".tmp_step_000004" / "state").mkdir(parents=True)
    (run / "checkpoints" / "step_000005").mkdir()  # no state: not complete
    assert checkpoints.latest_checkpoint(run).name == "step_000003"
    result = training.train(_cfg(tmp_path, 4, checkpoints={"interval": 10}), run, manifest, resume_from=run)
    assert result.final_step == 4
    assert not (run / "checkpoints" / ".tmp_step_000004").exists()


def test_resume_of_a_finished_run_does_nothing(tmp_path, manifest):
    run = tmp_path / "run"
    training.train(_cfg(tmp_path, 3), run, manifest)
    before = (run / "logs" / "metrics.jsonl").read_text()
    result = training.train(_cfg(tmp_path, 3), run, manifest, resume_from=run)
    assert result.final_step == 3 and len(result.checkpoints) == 1
    assert (run / "logs" / "metrics.jsonl").read_text() == before


def test_sigkill_after_a_checkpoint_then_resume_loses_nothing(tmp_path, manifest):
    """A real training process killed with SIGKILL mid-run; the resume ends bit-identical to a straight run."""
    cfg_long = _cfg(tmp_path, 100_000, checkpoints={"interval": 2})
    run = tmp_path / "killed"
    run.mkdir()
    (run / "config.yaml").write_text(cfg_long.to_yaml())
    cmd = [sys.executable, "-m", "ltxv_tuner.launch", "--config", str(run / "config.yaml")]
    cmd += ["--run-dir", str(run), "--manifest", str(manifest)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            done = checkpoints.list_checkpoints(run)
            if done and done[-1][0] >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training process ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    last = checkpoints.list_checkpoints(run)[-1][0]
    target = last + 2
    result = training.train(_cfg(tmp_path, target, checkpoints={"interval": 2}), run, manifest, resume_from=run)
    assert result.final_step == target

    straight = tmp_path / "straight"
    training.train(_cfg(tmp_path, target, checkpoints={"interval": target}), straight, manifest)
    _assert_same_weights(
        trainable_from_checkpoint(straight / "checkpoints" / f"step_{target:06d}"),
        trainable_from_checkpoint(run / "checkpoints" / f"step_{target:06d}"),
    )
    assert [r["step"] for r in _metrics(run)] == list(range(1, target + 1))
    assert not list((run / "checkpoints").glob(".tmp*"))


def test_a_partly_copied_or_damaged_checkpoint_from_before_checksums_is_refused_with_the_fix(tmp_path: Path):
    state = tmp_path / "step_000004" / "state"
    state.mkdir(parents=True)
    (state / "training_state.json").write_text(json.dumps({"step": 4, "data_position": 8, "num_processes": 2}))
    (state / "optimizer.bin").write_bytes(b"PK\x03\x04 truncated")
    (state / "random_states_0.pkl").write_bytes(b"")
    (state / "trainable.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(UserError) as e:
        checkpoints.check_state_files(tmp_path / "step_000004")
    msg = str(e.value)
    assert "optimizer.bin is damaged" in msg and "scheduler.bin is missing" in msg
    assert "random_states_0.pkl is damaged" in msg and "random_states_1.pkl is missing" in msg
    assert "trainable.safetensors is damaged" in msg and "no earlier checkpoint" in msg and "\n" not in msg


def test_quant_int8_two_plus_two_steps_equal_four_straight(tmp_path, manifest):
    """The int8 base is quantized again from the same base weights at resume (deterministic), and the state holds
    only the adapter: a resumed int8 run continues bit for bit."""
    pytest.importorskip("torchao")
    int8 = {
        "acceleration": {"quantize_base": "int8"},
        "training": {"enable_gradient_checkpointing": True},
        "checkpoints": {"interval": 2},
    }
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    training.train(_cfg(tmp_path, 4, **int8), straight, manifest)
    training.train(_cfg(tmp_path, 2, **int8), resumed, manifest)
    result = training.train(_cfg(tmp_path, 4, **int8), resumed, manifest, resume_from=resumed)
    assert result.final_step == 4
    a = trainable_from_checkpoint(straight / "checkpoints" / "step_000004")
    _assert_same_weights(a, trainable_from_checkpoint(resumed / "checkpoints" / "step_000004"))
    assert all(".lora_" in k for k in a)  # no base weights in the state
    assert [r["loss"] for r in _metrics(straight)] == [r["loss"] for r in _metrics(resumed)]


def test_resume_that_stretches_the_lr_schedule_says_so(tmp_path, manifest):
    """3 -> 5 steps on a linear schedule: the LR, 0 at the end of the old schedule, jumps back up. The log says
    so, with the number metrics.jsonl then shows; a resume that keeps the schedule says nothing about it."""

    def cfg(steps, **training):
        return make_config(
            tmp_path, buckets=BUCKETS, training={"steps": steps, "scheduler_type": "linear", **training},
            checkpoints={"interval": 3},
        )  # fmt: skip

    run = tmp_path / "run"
    training.train(cfg(3), run, manifest)
    training.train(cfg(5), run, manifest, resume_from=run)
    log = (run / "logs" / "train.log").read_text()
    lr4 = next(r["lr"] for r in _metrics(run) if r["step"] == 4)
    assert lr4 > 0
    assert (
        f"note: training.steps 3 -> 5 since the checkpoint: the LR schedule now spans 5 steps, so the LR jumps from "
        f"0.000e+00 at step 3 to {lr4:.3e} at step 4" in log
    )


def test_resume_with_another_learning_rate_applies_it_to_the_optimizer_and_says_so(tmp_path, manifest, monkeypatch):
    """The peak LR and weight decay live in the restored optimizer and schedule state: a changed value used to be
    recorded in config.yaml and ignored. Now the optimizer steps with the new schedule's value from the next step."""

    def cfg(steps, **training):
        return make_config(
            tmp_path, buckets=BUCKETS, checkpoints={"interval": 3},
            training={"steps": steps, "scheduler_type": "linear", "weight_decay": 0.01, **training},
        )  # fmt: skip

    run = tmp_path / "run"
    training.train(cfg(3), run, manifest)
    before = (run / "logs" / "train.log").read_text()
    seen = {}
    real_fit = training.fit

    def fit(tr):
        seen.update(tr.optimizer.param_groups[0])
        return real_fit(tr)

    monkeypatch.setattr(training, "fit", fit)
    training.train(cfg(6, learning_rate=5e-3, weight_decay=0.02), run, manifest, resume_from=run)
    # the new linear schedule over 6 steps at step 3: 5e-3 * (6 - 3) / 6 (the restored state said 1e-3 * 0)
    assert seen["lr"] == pytest.approx(2.5e-3, rel=1e-12) and seen["initial_lr"] == 5e-3
    assert seen["weight_decay"] == 0.02
    assert [r["lr"] for r in _metrics(run) if r["step"] > 3] == pytest.approx([5e-3 * 2 / 6, 5e-3 / 6, 0.0])
    log = (run / "logs" / "train.log").read_text()[len(before) :]
    assert (
        "resume: changed since step_000003, applied from step 4: training.learning_rate 0.001 -> 0.005; "
        "training.steps 3 -> 6; training.weight_decay 0.01 -> 0.02; the optimizer's learning rate for step 4 is "
        "2.500e-03" in log
    )


def test_resume_refuses_settings_that_change_what_the_checkpoint_means_naming_both_values(tmp_path, manifest):
    run = tmp_path / "run"
    training.train(_cfg(tmp_path, 3), run, manifest)
    changed = _cfg(tmp_path, 6, training={"batch_size": 1}, dataset={"id_token": "SQUISH"})
    changed = changed.model_copy(update={"seed": 8})
    with pytest.raises(UserError) as e:
        training.train(changed, run, manifest, resume_from=run)
    message = str(e.value)
    assert "dataset.id_token: None -> 'SQUISH'; training.batch_size: 2 -> 1; seed: 7 -> 8" in message
    assert "\n" not in message
    # other data (here: other latents for the same clips) is refused too, once it is known (after preprocessing)
    other = make_cache(tmp_path / "other", buckets=BUCKETS, clips_per_bucket=3, seed=1)
    with pytest.raises(UserError, match=r"the training data changed since .*step_000003 was written \(dataset: the "
                       r"same 6 clip\(s\) count, but other clips, captions or latents\)"):  # fmt: skip
        training.train(_cfg(tmp_path, 6), run, other, resume_from=run)
    assert checkpoints.latest_checkpoint(run).name == "step_000003"


def test_a_checkpoint_from_before_checksums_still_resumes(tmp_path, manifest):
    run = tmp_path / "run"
    training.train(_cfg(tmp_path, 3), run, manifest)
    path = run / "checkpoints" / "step_000003" / "state" / "training_state.json"
    state = json.loads(path.read_text())
    assert set(state["files"]) == {"optimizer.bin", "random_states_0.pkl", "scheduler.bin", "trainable.safetensors"}
    path.write_text(json.dumps({k: v for k, v in state.items() if k not in ("files", "checksum", "data")}))
    assert training.train(_cfg(tmp_path, 4), run, manifest, resume_from=run).final_step == 4


def _damage(path: Path) -> bytes:
    """Flip one byte in the middle (a torch zip archive stays a zip archive: only its checksum shows it)."""
    original = path.read_bytes()
    middle = len(original) // 2
    path.write_bytes(original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1 :])
    return original


def test_a_damaged_state_file_is_refused_naming_it_and_an_earlier_checkpoint_resumes_exactly(quickstart_config):
    """Issue 15: every state file (the RNG state included, which accelerate would skip silently) is checked
    against the checksum recorded when it was written; `--resume latest` refuses in one line naming the file and
    the checkpoint to resume from, and `--resume <that checkpoint>` trains the later steps again exactly."""
    more = ["checkpoints.interval=2", "checkpoints.auto_convert_to_comfy=false"]
    cfg = load_config(quickstart_config, ["training.steps=4", "lora.dropout=0.1", *more])
    run = pipeline.run(cfg)
    step2, step4 = checkpoints.checkpoint_dir(run, 2), checkpoints.checkpoint_dir(run, 4)
    want = trainable_from_checkpoint(step4)
    want = {k: v.clone() for k, v in want.items()}
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainable.safetensors",
                 "training_state.json"):  # fmt: skip
        path = step4 / "state" / name
        original = _damage(path)
        with pytest.raises(UserError) as e:
            pipeline.run(cfg, resume="latest")
        message = str(e.value)
        assert name in message and "damaged" in message and "\n" not in message, message
        assert message.endswith(f"resume from the checkpoint before it: --resume {step2}"), message
        if name != "random_states_0.pkl":
            path.write_bytes(original)
    # random_states_0.pkl of step 4 stays damaged: resume from step 2, which trains steps 3-4 again
    assert pipeline.run(cfg, resume=str(step2)) == run
    _assert_same_weights(want, trainable_from_checkpoint(step4))
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]
    # a caption edited since: preprocessing encodes it, then the resume is refused (other data, same clip count)
    caption = Path(cfg.dataset.data_folder) / "sunset.txt"
    caption.write_text(caption.read_text() + " at dusk")
    with pytest.raises(UserError, match=r"the training data changed since .*step_000004 was written \(dataset: the "
                       r"same 4 clip\(s\) count, but other clips, captions or latents\)"):  # fmt: skip
        pipeline.run(load_config(quickstart_config, ["training.steps=6", "lora.dropout=0.1", *more]), resume="latest")
    assert checkpoints.latest_checkpoint(run) == step4

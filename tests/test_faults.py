"""Hostile input and faults (issue 15): every failure a user can cause gets a one-line answer, no NaN model is
a success, no run outlives its owner, nothing shared is deleted under a running job."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training import make_cache, make_config, trainable_from_checkpoint

from ltxv_tuner import checkpoints, training


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return make_cache(tmp_path / "data")


# --------------------------------------------------------------------------------------------------
# Non-finite loss or gradients


def test_a_nan_loss_stops_the_run_naming_the_step_and_exports_nothing_of_it(tmp_path, manifest, monkeypatch):
    calls = []
    real_loss = training.flow_matching_loss

    def loss_nan_from_step_3(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(training, "flow_matching_loss", loss_nan_from_step_3)
    run = tmp_path / "run"
    with pytest.raises(training.NonFiniteError, match=r"training stopped at step 3: loss nan.*step 2") as err:
        training.train(make_config(tmp_path, training={"steps": 4}, checkpoints={"interval": 2}), run, manifest)
    assert "\n" not in str(err.value)
    assert [p.name for p in checkpoints.weight_files(run)] == ["ltxv_lora_step_000002.safetensors"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert not (run / "logs" / training.RESULT_FILE).exists()
    assert all(t.isfinite().all() for t in trainable_from_checkpoint(run / "checkpoints" / "step_000002").values())
    rows = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # steps 1 and 2; nothing of the NaN step


def test_weights_that_overflow_are_never_exported(tmp_path, manifest, monkeypatch):
    real_step = training.optimizer_step

    def poison(accelerator, model, *args):
        out = real_step(accelerator, model, *args)
        if args[-2] == 1:  # the last of 2 steps: its loss and gradients were finite
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))
        return out

    monkeypatch.setattr(training, "optimizer_step", poison)
    run = tmp_path / "run"
    with pytest.raises(training.NonFiniteError, match="step 2: the trained weights are no longer finite"):
        training.train(make_config(tmp_path, training={"steps": 2}), run, manifest)
    assert checkpoints.weight_files(run) == []


# --------------------------------------------------------------------------------------------------
# Validation never changes the training stream


VALIDATE = {"interval": 2, "prompts": ["a red ball"], "video_dims": [64, 64, 9], "inference_steps": 2}


def _dropout_cfg(tmp_path, steps, validation=None):
    return make_config(
        tmp_path,
        training={"steps": steps},
        lora={"dropout": 0.3},
        checkpoints={"interval": 2},
        validation=validation or {"interval": None},
    )


def test_validation_with_dropout_changes_nothing_and_resume_from_a_validation_step_is_exact(tmp_path, manifest):
    plain, validated, resumed = tmp_path / "plain", tmp_path / "validated", tmp_path / "resumed"
    training.train(_dropout_cfg(tmp_path, 4), plain, manifest)
    training.train(_dropout_cfg(tmp_path, 4, VALIDATE), validated, manifest)
    training.train(_dropout_cfg(tmp_path, 2, VALIDATE), resumed, manifest)
    training.train(_dropout_cfg(tmp_path, 4, VALIDATE), resumed, manifest, resume_from=resumed)
    assert (validated / "validation" / "step_000002").is_dir()
    want = trainable_from_checkpoint(plain / "checkpoints" / "step_000004")
    for run in (validated, resumed):
        got = trainable_from_checkpoint(run / "checkpoints" / "step_000004")
        assert all(torch.equal(want[k], got[k]) for k in want), run.name

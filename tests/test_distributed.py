"""Two real CPU processes through `accelerate launch` (gloo): one set of checkpoints, one log, result from files."""

from __future__ import annotations

import json

import pytest
import torch
from test_training import make_cache, make_config, trainable_from_checkpoint

from ltxv_tuner import launch


def test_launch_command_for_two_cpu_processes(tmp_path):
    cfg = make_config(tmp_path, training={"distributed": True, "num_processes": 2})
    cmd = launch.launch_command(cfg, tmp_path / "run", tmp_path / "m.json", None)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("--config") + 1] == str(tmp_path / "run" / "config.yaml")
    assert "ltxv_tuner.launch" in cmd


def test_two_process_cpu_run_end_to_end_then_resume(tmp_path, capfd):
    manifest = make_cache(tmp_path / "data", clips_per_bucket=4)
    cfg = make_config(
        tmp_path, training={"distributed": True, "num_processes": 2, "steps": 4}, checkpoints={"interval": 2}
    )
    run = tmp_path / "run"
    result = launch.train(cfg, run, manifest)

    # The terminal (both processes write to it) tells the story once: rank 0 prints, rank 1 does not.
    terminal = "".join(capfd.readouterr())
    for line in ("training lora: 4 clips", "step 4 loss", f"checkpoint {run / 'checkpoints' / 'step_000004'}",
                 "training done: step 4"):  # fmt: skip
        assert terminal.count(line) == 1, (line, terminal)

    assert result.final_step == 4
    assert [p.parent.name for p in result.checkpoints] == ["step_000002", "step_000004"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    state_dir = run / "checkpoints" / "step_000004" / "state"
    rng_files = sorted(p.name for p in state_dir.glob("random_states_*.pkl"))
    assert rng_files == ["random_states_0.pkl", "random_states_1.pkl"]
    state = json.loads((state_dir / "training_state.json").read_text())
    assert state["num_processes"] == 2 and state["data_position"] == 8  # 4 steps x 2 processes
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    log = (run / "logs" / "train.log").read_text()
    assert log.count("training done: step 4") == 1
    assert all(torch.isfinite(t).all() for t in trainable_from_checkpoint(state_dir.parent).values())

    more = make_config(
        tmp_path, training={"distributed": True, "num_processes": 2, "steps": 6}, checkpoints={"interval": 2}
    )
    (run / "config.yaml").write_text(more.to_yaml())  # what the pipeline does before a resume
    resumed = launch.train(more, run, manifest, resume_from=run)
    assert resumed.final_step == 6
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_quant_int8_two_process_run(tmp_path):
    """DDP cannot broadcast torchao's int8 weights at start; they are left out of its sync (each process
    quantizes the same base weights the same way)."""
    pytest.importorskip("torchao")
    manifest = make_cache(tmp_path / "data", clips_per_bucket=4)
    cfg = make_config(
        tmp_path,
        training={"distributed": True, "num_processes": 2, "steps": 2, "enable_gradient_checkpointing": True},
        acceleration={"quantize_base": "int8"},
        checkpoints={"interval": 2},
    )
    result = launch.train(cfg, tmp_path / "run", manifest)
    assert result.final_step == 2 and result.final_loss is not None
    assert all(torch.isfinite(t).all() for t in trainable_from_checkpoint(result.checkpoints[-1].parent).values())


def test_accelerate_config_with_fsdp_needs_training_sharding(tmp_path):
    from ltxv_tuner.config import validate_config
    from ltxv_tuner.errors import UserError
    from ltxv_tuner.launch import launch_command

    acc = tmp_path / "fsdp.yaml"
    acc.write_text("distributed_type: FSDP\nnum_processes: 2\n")
    cfg = validate_config({"dataset": {"data_folder": "x"}, "training": {"accelerate_config": str(acc)}})
    with pytest.raises(UserError, match="distributed_type FSDP; set training.sharding: fsdp"):
        launch_command(cfg, tmp_path, tmp_path / "m.json", None)
    acc.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nmachine_rank: 0\nnum_processes: 16\n")
    cmd = launch_command(cfg, tmp_path, tmp_path / "m.json", None)
    assert cmd[cmd.index("--config_file") + 1] == str(acc)


def test_worker_exits_quietly_on_ctrl_c(monkeypatch, tmp_path, capsys):
    """Ctrl-C reaches every launched process: each exits 130 without a per-rank KeyboardInterrupt traceback."""

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "load_config", lambda path: None)
    monkeypatch.setattr(launch.training, "train", interrupted)
    args = ["--config", "c.yaml", "--run-dir", str(tmp_path), "--manifest", "m.json"]
    assert launch.main(args) == 130
    assert "Traceback" not in capsys.readouterr().err

"""Hostile input and faults (issue 15): every failure a user can cause gets a one-line answer, no NaN model is
a success, no run outlives its owner, nothing shared is deleted under a running job."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from test_training import make_cache, make_config, trainable_from_checkpoint

from ltxv_tuner import cache, checkpoints, cli, launch, locks, pipeline, preflight, training
from ltxv_tuner.config import load_config
from ltxv_tuner.dataset import BatchOrder, CachedDataset, CacheFileChanged, step_batches
from ltxv_tuner.errors import ConfigError, UserError, explain_failure


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return make_cache(tmp_path / "data")


# --------------------------------------------------------------------------------------------------
# Non-finite loss or gradients


def test_a_nan_loss_stops_the_run_naming_the_step_and_exports_nothing_of_it(tmp_path, manifest, monkeypatch):
    calls = []
    from ltxv_tuner.strategies import flow_matching

    real_loss = flow_matching.flow_matching_loss

    def loss_nan_from_step_3(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(flow_matching, "flow_matching_loss", loss_nan_from_step_3)
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

    def poison(accelerator, model, *args, **kwargs):
        out = real_step(accelerator, model, *args, **kwargs)
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
# Cache files verified by content


def test_a_cache_file_changed_after_preprocessing_stops_training_in_one_line_naming_it(tmp_path, manifest):
    clip = cache.Manifest.read(manifest).clips[1]
    path = cache.latent_path(manifest.parent.parent, clip.latent_key)
    size = path.stat().st_size
    cache.save_tensors_atomic(path, {"latents": torch.zeros(clip.latent_shape)})  # another file of the same size
    assert path.stat().st_size == size
    run = tmp_path / "run"
    with pytest.raises(CacheFileChanged) as err:
        training.train(make_config(tmp_path, training={"steps": 2}), run, manifest)
    message = str(err.value)
    assert message.startswith(f"{path}: this cache file changed since preprocessing wrote it")
    assert "run the preprocess stage again" in message and "\n" not in message
    assert checkpoints.weight_files(run) == []
    # GPU runs read ahead in a DataLoader worker process: the error comes back as the same one line
    data = CachedDataset(manifest, make_config(tmp_path))
    order = BatchOrder(data.bucket_groups(), 2, seed=7)
    with pytest.raises(CacheFileChanged) as err:
        list(step_batches(data, order, 0, 0, 1, 1, 0, 1, torch.device("cpu"), workers=1))
    assert str(err.value) == message


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


# --------------------------------------------------------------------------------------------------
# Run ownership: a lock per run folder, prune keeps what live runs read, workers die with their owner

TRAIN_SCRIPT = """
import sys
from pathlib import Path
from ltxv_tuner import launch
from ltxv_tuner.config import load_config
from ltxv_tuner.dataset import BatchOrder, CachedDataset, CacheFileChanged, step_batches
run, manifest = Path(sys.argv[2]), Path(sys.argv[3])
launch.train(load_config(sys.argv[1]), run, manifest, resume_from=run if sys.argv[4] == "resume" else None)
"""


def _start_training(tmp_path: Path, cfg, run: Path, manifest: Path, resume: bool) -> subprocess.Popen:
    config = tmp_path / f"cfg_{time.monotonic_ns()}.yaml"
    config.write_text(cfg.to_yaml())
    args = [sys.executable, "-c", TRAIN_SCRIPT, str(config), str(run), str(manifest), "resume" if resume else "new"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(condition, what: str, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_second_resume_of_a_live_run_is_refused_naming_the_process_then_a_stale_lock_is_taken_over(
    tmp_path, manifest
):
    run = tmp_path / "outputs" / "run_20250101_000000"
    training.train(make_config(tmp_path, training={"steps": 2}), run, manifest)
    long = make_config(tmp_path, training={"steps": 100_000}, checkpoints={"interval": None})
    first = _start_training(tmp_path, long, run, manifest, resume=True)
    try:
        _wait_for(lambda: (locks.read_holder(run / locks.RUN_LOCK_FILE) or {}).get("pid") == first.pid, "the lock")
        with pytest.raises(UserError, match=rf"is being trained by process {first.pid} .*kill {first.pid}") as err:
            pipeline.run(long, resume="latest")
        assert "\n" not in str(err.value)
        assert first.poll() is None  # the first one trains on
    finally:
        first.kill()
        first.wait()
    # The SIGKILLed holder left its lock behind: the next resume takes it over and trains.
    assert locks.read_holder(run / locks.RUN_LOCK_FILE)["pid"] == first.pid
    result = launch.train(make_config(tmp_path, training={"steps": 3}), run, manifest, resume_from=run)
    assert result.final_step == 3
    assert not (run / locks.RUN_LOCK_FILE).exists()


def test_prune_keeps_the_files_of_a_manifest_a_live_run_reads(tmp_path):
    from ltxv_tuner.cache import Manifest
    from ltxv_tuner.preprocess import _prune

    data = tmp_path / "data"
    live = make_cache(data, seed=1)
    other = Manifest.read(make_cache(data, buckets=((96, 64, 17),), seed=2))
    root = live.parent.parent
    files = lambda: sorted(p.name for p in root.glob("[lc]*/*.safetensors"))  # noqa: E731
    before = files()
    with locks.cache_reader(root, live):
        assert _prune(root, other) == 0
        assert files() == before
    assert _prune(root, other) == 4  # the live run is gone: its 2 latents + 2 conditions go
    assert len(files()) == 4


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_top_level_process_of_a_two_process_run_leaves_no_worker(tmp_path, sig):
    manifest = make_cache(tmp_path / "data", clips_per_bucket=4)
    cfg = make_config(tmp_path, training={"distributed": True, "num_processes": 2, "steps": 100_000},
                      checkpoints={"interval": None})  # fmt: skip
    run = tmp_path / "run"
    top = _start_training(tmp_path, cfg, run, manifest, resume=False)
    family: list[int] = []
    try:
        _wait_for(lambda: (run / "logs" / "metrics.jsonl").is_file(), "the first training steps")
        family = _descendants(top.pid)
        assert len(family) >= 3  # the accelerate launcher and its two workers
        os.kill(top.pid, sig)
        top.wait()
        _wait_for(lambda: not any(locks.pid_alive(p) for p in family), "the workers to die", timeout=30)
    finally:
        for p in family + _descendants(top.pid):  # orphans of a failed run must not train on
            if locks.pid_alive(p):
                os.kill(p, signal.SIGKILL)
        top.kill()


# A launcher that starts a worker which needs 2 s to start (imports), then waits; the test kills it meanwhile.
LAUNCHER = """
import os, subprocess, sys, time
worker = "import time; time.sleep(2); from ltxv_tuner import launch; launch.die_with_parent(); time.sleep(120)"
env = {**os.environ, "LTXV_TUNER_OWNER_PID": sys.argv[1]}
print(subprocess.Popen([sys.executable, "-c", worker], env=env).pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
def test_a_worker_whose_launcher_died_while_it_started_exits_instead_of_waiting_for_a_rendezvous():
    """The parent-death signal covers a parent that dies after the worker asked for it; a launcher killed while its
    workers still import left them running (they then wait for the rendezvous for half an hour)."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(os.getpid())], stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    try:
        launcher.kill()  # before the worker reaches die_with_parent
        launcher.wait()
        assert locks.pid_alive(worker)
        _wait_for(lambda: not locks.pid_alive(worker), "the orphaned worker to exit", timeout=30)
    finally:
        if locks.pid_alive(worker):
            os.kill(worker, signal.SIGKILL)


WORKER = """
import sys, time
from pathlib import Path
from ltxv_tuner import locks
with locks.run_worker(Path(sys.argv[1])):
    time.sleep(120)
"""


def test_a_run_lock_is_not_taken_over_while_a_process_the_dead_owner_launched_still_runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    owner.wait()
    (run / locks.RUN_LOCK_FILE).write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname()}))
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(run)])
    try:
        _wait_for(lambda: locks.live_workers(run), "the worker to register")
        with pytest.raises(UserError, match=rf"launched still run \(process {worker.pid} .*kill {worker.pid}\)") as e:
            with locks.run_lock(run):
                pass
        assert "\n" not in str(e.value)
    finally:
        worker.kill()
        worker.wait()
    with locks.run_lock(run) as lock:  # all gone: the stale lock is taken over
        assert locks.read_holder(lock)["pid"] == os.getpid()
    assert not list((run / locks.WORKERS_DIR).iterdir())


# --------------------------------------------------------------------------------------------------
# OS and library failures: one line with the path and the fix, earlier data intact


def _fill_disk_at(monkeypatch, marker: str) -> None:
    """Every atomic write whose temp file lies under `marker` fails as on a full disk."""
    real = cache.save_file

    def save_file(tensors, path, metadata=None):
        if marker in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(cache, "save_file", save_file)


def test_disk_full_while_saving_a_checkpoint_is_one_line_and_earlier_checkpoints_are_intact(
    tmp_path, manifest, monkeypatch
):
    run = tmp_path / "run"
    cfg = make_config(tmp_path, training={"steps": 4}, checkpoints={"interval": 2})
    _fill_disk_at(monkeypatch, ".tmp_step_000004")
    with pytest.raises(UserError, match=r"step_000004.*: disk full while writing .*intact.*free space") as err:
        training.train(cfg, run, manifest)
    assert "\n" not in str(err.value)
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000002"]
    before = trainable_from_checkpoint(run / "checkpoints" / "step_000002")
    monkeypatch.undo()
    assert training.train(cfg, run, manifest, resume_from=run).final_step == 4  # same command again, space freed
    assert all(torch.equal(before[k], v) for k, v in trainable_from_checkpoint(run / "checkpoints/step_000002").items())


class _FullDisk:
    """A file whose writes fail as on a full disk once `full()` says so."""

    def __init__(self, file, full):
        self.file, self.full = file, full

    def write(self, text):
        if self.full():
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _fill_disk_for(monkeypatch, name: str, full) -> None:
    """Writes to every file called `name` opened from now on fail with ENOSPC while `full()` is true."""
    import builtins

    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _FullDisk(f, full) if Path(str(file)).name == name and set(mode) & set("wa") else f

    monkeypatch.setattr(builtins, "open", open_)


@pytest.mark.parametrize("name", ["metrics.jsonl", "train.log"])
def test_disk_full_while_writing_the_run_logs_is_one_line_and_checkpoints_are_intact(
    tmp_path, manifest, monkeypatch, capfd, name
):
    run = tmp_path / "run"
    cfg = make_config(tmp_path, training={"steps": 4}, checkpoints={"interval": 2})
    _fill_disk_for(monkeypatch, name, lambda: (run / "checkpoints" / "step_000002").exists())
    with pytest.raises(UserError) as err:
        training.train(cfg, run, manifest)
    message = str(err.value)
    what = {"metrics.jsonl": "the training metrics", "train.log": "the run log"}[name]
    assert message.startswith(f"{run / 'logs' / name}: disk full while writing {what} (the run stopped; "
                              "checkpoints written so far are intact"), message  # fmt: skip
    assert "free space" in message and "--resume latest" in message and "\n" not in message
    assert "Traceback" not in "".join(capfd.readouterr())  # not logging's own report of a failed write
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000002"]
    before = trainable_from_checkpoint(run / "checkpoints" / "step_000002")
    monkeypatch.undo()
    assert training.train(cfg, run, manifest, resume_from=run).final_step == 4  # space freed: resume
    assert all(torch.equal(before[k], v) for k, v in trainable_from_checkpoint(run / "checkpoints/step_000002").items())


@pytest.mark.parametrize(
    ("failure", "answer"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/x/a.bin"), "/x/a.bin: disk full"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 64"), "disk full"),
        (SafetensorError('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
         "disk full"),
        (PermissionError(errno.EACCES, "Permission denied", "/x/b"), "/x/b: permission denied"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/c"), "/ro/c: read-only file system"),
        (MemoryError(), "out of memory"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
         "out of memory"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "out of GPU memory"),
    ],
)  # fmt: skip
def test_machine_failures_become_one_line_answers(failure, answer):
    text = explain_failure(failure)
    assert text is not None and text.startswith(answer) and "\n" not in text
    assert explain_failure(ValueError("a bug")) is None


def test_the_cli_answers_a_machine_failure_in_one_line(monkeypatch, capsys, quickstart_config):
    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(pipeline, "run", out_of_memory)
    assert cli.main([str(quickstart_config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of memory") and "\n" not in err and "traceback" not in err


@pytest.mark.parametrize(
    ("content", "answer"),
    [
        ("dataset:\n  data_folder: d\n".encode("utf-16"), "is UTF-16 encoded; save it as UTF-8"),
        (b"\x00\x01\x02PK\x03\x04", "a binary file, not a YAML config"),
        (b"# caf\xe9 clips\ndataset:\n  data_folder: d\n", "line 1: byte 0xe9 is not UTF-8"),
    ],
)
def test_config_files_are_read_as_bytes_with_a_clear_encoding_error(tmp_path, content, answer):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(answer)):
        load_config(path)


def test_a_yaml_alias_bomb_is_answered_quickly_with_bounded_values(tmp_path):
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("x:\n" + "".join(f"  {line}\n" for line in levels) + "dataset:\n  resolution_buckets: *h\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.monotonic() - started < 5
    assert len(str(err.value)) < 10_000 and "more" in str(err.value)


# --------------------------------------------------------------------------------------------------
# Paths and every check that can run before preprocessing


def _problems(tmp_path, **sections) -> str:
    with pytest.raises(UserError) as err:
        make_config(tmp_path, **sections)
    return str(err.value)


def test_empty_or_overlapping_paths_are_refused_at_config_time(tmp_path):
    assert "dataset.data_folder: is empty, which would mean the folder you run in" in _problems(
        tmp_path, dataset={"data_folder": " "}
    )
    assert "output_dir: is empty" in _problems(tmp_path, output_dir="")
    inside = _problems(tmp_path, output_dir=str(tmp_path / "data" / "runs"))
    assert "is inside dataset.data_folder" in inside and "put output_dir outside it" in inside
    assert "output_dir" in _problems(tmp_path, output_dir=str(tmp_path / "data"))


def test_checks_that_can_run_before_preprocessing_run_there(tmp_path, monkeypatch):
    assert "seed: Input should be less than 2147483648" in _problems(tmp_path, seed=2**40)
    assert "seed: Input should be greater than or equal to 0" in _problems(tmp_path, seed=-1)
    real_find_spec = preflight.importlib.util.find_spec
    monkeypatch.setattr(
        preflight.importlib.util, "find_spec", lambda n: None if n == "bitsandbytes" else real_find_spec(n)
    )
    cfg = make_config(tmp_path, training={"optimizer_type": "adamw8bit"})
    with pytest.raises(UserError, match="adamw8bit needs bitsandbytes"):
        pipeline.run(cfg)
    with pytest.raises(UserError, match="--run-dir x goes with --only convert; .*--resume x"):
        pipeline.run(make_config(tmp_path), run_dir="x")
    assert not (tmp_path / "data" / ".precomputed").exists()  # nothing preprocessed
    assert not (tmp_path / "outputs").exists()  # no empty run folder

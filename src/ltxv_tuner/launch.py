"""Launching is not the trainer's job: this module owns `accelerate launch` and the entry point of each process
it starts (`python -m ltxv_tuner.launch`). `train()` runs the in-process trainer, or launches it in several
processes and collects the result from the run folder.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from . import checkpoints as ckpts
from . import locks, logs, training
from .config import Config, load_config
from .errors import UserError, explain_failure
from .preflight import check_accelerate_config, check_acceleration

log = logging.getLogger("ltxv_tuner.launch")
LAUNCHED_ENV = "LTXV_TUNER_LAUNCHED"  # set in launched processes: they train, they do not launch again
OWNER_ENV = "LTXV_TUNER_OWNER_PID"  # the top-level process a launched process belongs to (see die_with_parent)


def wants_distributed(cfg: Config) -> bool:
    t = cfg.training
    return bool(t.distributed or t.accelerate_config) and os.environ.get(LAUNCHED_ENV) != "1"


def train(cfg: Config, run_dir: Path, manifest_path: Path, resume_from: Path | None = None) -> training.TrainResult:
    """Train on the manifest's cached clips: in this process, or in several through `accelerate launch`
    (`training.distributed` / `training.accelerate_config`)."""
    check_acceleration(cfg)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    # One process trains a run at a time; a prune by another config keeps the files this run reads.
    with locks.run_lock(run_dir), locks.cache_reader(Path(manifest_path).parent.parent, manifest_path):
        if wants_distributed(cfg):
            return train_distributed(cfg, run_dir, manifest_path, resume_from)
        return training.train(cfg, run_dir, manifest_path, resume_from)


def die_with_parent(owner: int | None = None) -> None:
    """Linux: ask the kernel to SIGKILL this process when its parent dies (also when the parent is SIGKILLed and
    can clean up nothing). Elsewhere a no-op.

    The request covers a parent that dies after it is made. A launched process makes it only once its imports are
    done (seconds after it started); if the run's owner - the top-level process, `owner` or `OWNER_ENV` - or the
    launcher between them died meanwhile, the owner is no longer among this process's ancestors, and it exits here
    rather than wait half an hour for a rendezvous that never comes."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    owner = owner or int(os.environ.get(OWNER_ENV) or 0)
    if owner and not descends_from(owner):
        os._exit(1)


def descends_from(owner: int) -> bool:
    """Whether `owner` is this process's parent, grandparent, ... (Linux /proc)."""
    pid = os.getppid()
    for _ in range(32):
        if pid == owner:
            return True
        if pid <= 1:
            return False
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            return False
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(cfg: Config, run_dir: Path, manifest_path: Path, resume_from: Path | None) -> list[str]:
    """The `accelerate launch` command line for a multi-process run of this module."""
    t = cfg.training
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if t.accelerate_config:
        if not Path(t.accelerate_config).is_file():
            raise UserError(f"training.accelerate_config: {t.accelerate_config} not found (give an accelerate YAML)")
        check_accelerate_config(Path(t.accelerate_config), cfg)
        cmd += ["--config_file", t.accelerate_config]
        if t.num_processes:
            cmd += ["--num_processes", str(t.num_processes)]
    else:
        n = t.num_processes or max(1, torch.cuda.device_count())
        # --multi_gpu also gives real CPU processes (gloo) on a machine without GPUs; --cpu would run only one.
        cmd += ["--num_machines", "1", "--num_processes", str(n), "--dynamo_backend", "no"]
        cmd += ["--multi_gpu"] if n > 1 else []
        cmd += ["--main_process_port", str(_free_port())]
    cmd += ["--mixed_precision", training.resolve_mixed_precision(cfg, torch.cuda.is_available())]
    cmd += ["-m", "ltxv_tuner.launch", "--config", str(Path(run_dir) / "config.yaml")]
    cmd += ["--run-dir", str(run_dir), "--manifest", str(manifest_path)]
    if resume_from is not None:
        cmd += ["--resume", str(resume_from)]
    return cmd


def train_distributed(
    cfg: Config, run_dir: Path, manifest_path: Path, resume_from: Path | None
) -> training.TrainResult:
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():  # the pipeline writes it; direct callers may not have
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(cfg.to_yaml(), encoding="utf-8")
    if resume_from is not None:
        ckpts.resolve_resume_checkpoint(resume_from)  # fail here, before starting processes
    result_file = run_dir / ckpts.LOGS_DIR / training.RESULT_FILE
    run_log = run_dir / ckpts.LOGS_DIR / logs.TRAIN_LOG
    result_file.unlink(missing_ok=True)
    cmd = launch_command(cfg, run_dir, manifest_path, resume_from)
    log.info("launching: %s", " ".join(cmd))
    env = {**os.environ, LAUNCHED_ENV: "1", OWNER_ENV: str(os.getpid())}
    # The launcher dies with this process (and each worker with the launcher, see `main`), however this one
    # ends: no orphaned workers keep training and writing checkpoints. Output streams live to the terminal.
    linux = sys.platform == "linux"
    preexec = functools.partial(die_with_parent, os.getpid()) if linux else None
    with subprocess.Popen(cmd, env=env, preexec_fn=preexec) as proc:
        try:
            rc = proc.wait()
        except BaseException:  # Ctrl-C reaches the launcher too (same process group); give it time to stop
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if rc != 0:
        raise UserError(f"distributed training failed (exit code {rc}); see the output above and {run_log}")
    if not result_file.is_file():
        raise UserError(
            f"distributed training ended without writing {result_file}; see {run_dir / 'logs' / logs.TRAIN_LOG}"
        )
    return training.TrainResult.from_json(json.loads(result_file.read_text(encoding="utf-8")))


def console_process() -> bool:
    """The one launched process per machine that prints the run's story on the terminal (local rank 0): the
    others would repeat every line. On the main machine it is the process that writes the files, too."""
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"


def main(argv: list[str] | None = None) -> int:
    """Entry point of each process started by `accelerate launch` (and usable by hand)."""
    parser = argparse.ArgumentParser(
        prog="python -m ltxv_tuner.launch",
        description="one process of a multi-process training run (started by accelerate launch)",
    )
    parser.add_argument("--config", required=True, help="the run's resolved config.yaml")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--resume", default=None, help="run folder to continue from")
    args = parser.parse_args(argv)
    die_with_parent()  # the accelerate launcher; it dies with the top-level process
    logs.quiet_libraries()  # each launched process would repeat diffusers' load-time warnings
    if console_process():
        logs.setup_console_logging(keep_backlog=False)
    else:
        logs.silence_console()
    try:
        cfg = load_config(args.config)
        resume = Path(args.resume) if args.resume else None
        with locks.run_worker(Path(args.run_dir)):  # the run's lock is not stale while this process trains it
            training.train(cfg, Path(args.run_dir), Path(args.manifest), resume)
    except UserError as e:  # this process's edge: print the message for the launcher, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches every process; the launcher's parent says "interrupted" once
        return 130
    except (Exception, MemoryError) as e:  # disk full, out of memory, ...: one line; anything else: the traceback
        answer = explain_failure(e)
        if answer is None:
            raise
        print(f"error: {answer}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Who holds what, so that nothing shared changes under a running job: the lock of a run folder while a process
trains it (with the processes it launched), and the cache manifests that live runs read (preprocessing's prune keeps
their files).

A holder is a small JSON file naming the process (pid, host, command, start time). A holder whose process no
longer runs on this host (killed, crashed) is stale and is taken over or ignored; nothing needs cleaning by hand.
A run lock is stale only when the processes training the run are all gone: the top-level process that holds it and
the launched processes registered in `<run>/.workers/` (on Linux they die with it; elsewhere, or if one did not,
a resume is refused naming it rather than train beside it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import UserError

RUN_LOCK_FILE = ".lock"
WORKERS_DIR = ".workers"
READERS_DIR = "readers"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie counts as gone)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl-C on Windows
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:  # a killed child not yet reaped by its parent still has a pid; it trains nothing
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def is_live(holder: dict | None) -> bool:
    """A holder on another host cannot be checked from here and counts as live."""
    if holder is None:
        return False
    return holder.get("host") != socket.gethostname() or pid_alive(holder["pid"])


def describe(holder: dict) -> str:
    pid, host, command, since = holder["pid"], holder.get("host"), holder.get("command", "?"), holder.get("started")
    return f"process {pid} on {host} ({command}, since {since})"


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(_me(), f)
    return True


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold `<run_dir>/.lock` while this process trains the run; a second process is refused naming the holder.
    Re-entrant within one process; a lock left by a process that no longer runs is taken over."""
    path = Path(run_dir) / RUN_LOCK_FILE
    for _ in range(3):
        if _try_create(path):
            break
        holder = read_holder(path)
        if holder is None and _age_s(path) < 10:  # another process has just created it and is writing it
            raise UserError(f"{run_dir} is being locked by another process right now; wait for it or try again")
        if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
            yield path  # this process holds it already (the pipeline, then launch.train)
            return
        if is_live(holder):
            raise UserError(
                f"{run_dir} is being trained by {describe(holder)}; wait for it to finish or stop it "
                f"(kill {holder['pid']}) - two processes writing one run would mix their checkpoints"
            )
        if workers := live_workers(run_dir):
            pids = " ".join(str(w["pid"]) for w in workers)
            raise UserError(
                f"{run_dir}: the process that trained it is gone but {len(workers)} process(es) it launched still "
                f"run ({describe(workers[0])}); stop them (kill {pids}) - two runs writing one folder would mix their "
                "checkpoints"
            )
        path.unlink(missing_ok=True)  # stale: its process is gone (killed, crashed)
    else:
        raise UserError(f"{path}: cannot take the run lock (another process keeps replacing it); try again")
    try:
        yield path
    finally:
        if (read_holder(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _registered(folder: Path, **extra):
    """A holder file for this process in `folder` for the duration of the block."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}_{time.monotonic_ns()}.json"
    path.write_text(json.dumps({**_me(), **extra}), encoding="utf-8")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def run_worker(run_dir: Path):
    """Register a launched process as training `run_dir` (its run lock is not stale while it runs)."""
    return _registered(Path(run_dir) / WORKERS_DIR)


def live_workers(run_dir: Path) -> list[dict]:
    """The registered processes of a run that still run on this host (registrations of other hosts cannot be checked
    from here and would outlive a killed run: they are not counted); registrations of gone processes are removed."""
    folder = Path(run_dir) / WORKERS_DIR
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        holder = read_holder(path)
        if holder is None or holder.get("host") != socket.gethostname():
            continue  # being written right now, or another host's
        if pid_alive(holder["pid"]):
            found.append(holder)
        else:
            path.unlink(missing_ok=True)
    return found


def cache_reader(cache_root: Path, manifest: Path):
    """Register this process as reading `manifest` (and so its files) while it trains."""
    return _registered(Path(cache_root) / READERS_DIR, manifest=str(manifest))


def live_reader_manifests(cache_root: Path) -> list[Path]:
    """Manifests that live runs are reading; registrations of processes that are gone are removed."""
    folder = Path(cache_root) / READERS_DIR
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        holder = read_holder(path)
        if is_live(holder):
            found.append(Path(holder["manifest"]))
        else:
            path.unlink(missing_ok=True)
    return found

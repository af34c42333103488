"""Where messages go: plain lines on the terminal, and every line of a run also in <run>/logs/train.log."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("ltxv_tuner")

TRAIN_LOG = "train.log"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def quiet_libraries() -> None:
    """diffusers/transformers warn at every load about things users cannot act on (dtype casts of tiny parts);
    torchao (optional, imported by diffusers when installed) warns about CUDA kernels it cannot load on a CPU.
    Their verbosity is set through their environment variables (read when they are imported), so a run that
    needs neither - a cache that is already complete - does not pay seconds to import them just to quiet them."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    # torchao registers enums with torch's pytree at import, which torch 2.13 logs as deprecated: not actionable.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    for var in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    for name in ("diffusers", "transformers"):  # already imported (a notebook, a test): set them directly
        if name in sys.modules:
            importlib.import_module(f"{name}.utils.logging").set_verbosity_error()


def setup_console_logging() -> None:
    """Plain INFO messages on stdout; the run's file handler is added once the run folder exists."""
    quiet_libraries()
    if any(getattr(h, "_ltxv_console", False) for h in log.handlers):
        return
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(logging.Formatter("%(message)s"))
    h._ltxv_console = True
    log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def _run_log_path(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / TRAIN_LOG


def attach_run_log(run_dir: Path) -> logging.Handler | None:
    """Every message of the run also goes to <run>/logs/train.log (appended on resume). None when it already does."""
    path = _run_log_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in log.handlers):
        return None
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    h = logging.FileHandler(path, encoding="utf-8")
    h.setFormatter(logging.Formatter(_FORMAT))
    log.addHandler(h)
    return h


@contextlib.contextmanager
def run_log(run_dir: Path, enabled: bool = True):
    """The run log for the duration of a block (a process that trains without the pipeline around it);
    detached afterwards only if this block attached it."""
    handler = attach_run_log(run_dir) if enabled else None
    try:
        yield
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()

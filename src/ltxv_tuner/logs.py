"""Where messages go: plain lines on the terminal, and the whole story of a run (preflight, preprocessing report,
training, conversion, the final error if any) also in <run>/logs/train.log.

- The run folder is made only once preprocessing has succeeded, so what is logged before it exists is kept
  (`setup_console_logging`) and written to train.log, with its own timestamps, when the log is attached.
- In a multi-process run only one process per machine prints (`launch.main`); the others log to nowhere but
  their errors, so the terminal tells the story once.
- Progress bars appear only on a terminal. Output redirected to a file or a CI log gets a plain progress line
  now and then instead of bar fragments glued onto log lines.
- Library noise that users cannot act on is silenced in every entry point (`quiet_libraries`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

log = logging.getLogger("ltxv_tuner")

TRAIN_LOG = "train.log"
_FILE_FORMAT = "%(asctime)s %(levelname)s %(message)s"
PROGRESS_LINE_EVERY_S = 60.0  # without a terminal: one progress line per this many seconds at most


def quiet_libraries() -> None:
    """diffusers/transformers warn at every load about things users cannot act on (dtype casts of tiny parts);
    torchao (optional, imported by diffusers and peft when installed) logs CUDA kernels it cannot load on a CPU and
    registers enums with torch's pytree, which torch 2.13 logs as deprecated; torch's CPU bf16 autocast warns that
    a norm cannot use its fused kernel. None of it is a failure, all of it reads like one. diffusers' and
    transformers' verbosity is set through their environment variables (read when they are imported), so a run
    that needs neither - a cache that is already complete - does not pay seconds to import them just to quiet them."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning)
    for var in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    for name in ("diffusers", "transformers"):  # already imported (a notebook, a test): set them directly
        if name in sys.modules:
            importlib.import_module(f"{name}.utils.logging").set_verbosity_error()


class _ConsoleHandler(logging.Handler):
    """Plain lines on stdout, `warning: ` / `error: ` in front by level (the run log has a level column instead).
    Written through tqdm, so a line never lands inside a progress bar on the terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            msg = self.format(record)
            if record.levelno >= logging.ERROR:
                msg = f"error: {msg}"
            elif record.levelno >= logging.WARNING:
                msg = f"warning: {msg}"
            tqdm.write(msg, file=sys.stdout)  # sys.stdout as it is now (tests and notebooks swap it)
            sys.stdout.flush()
        except Exception:  # logging's own convention: report the broken handler, never break the caller
            self.handleError(record)


class _Backlog(logging.Handler):
    """The records of a run logged before its folder exists (preflight, preprocessing), for its train.log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def setup_console_logging(keep_backlog: bool = True) -> None:
    """INFO messages on stdout; with keep_backlog, also kept until `attach_run_log` writes them to the run's file."""
    quiet_libraries()
    log.setLevel(logging.INFO)
    log.propagate = False
    if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
        h = _ConsoleHandler(logging.INFO)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
    if keep_backlog and not any(isinstance(h, _Backlog) for h in log.handlers):
        log.addHandler(_Backlog())


def silence_console() -> None:
    """A launched process other than the one that prints: nothing on the terminal but its errors (raised, and
    printed by its entry point), not even Python's last-resort output of warnings every process would repeat."""
    log.propagate = False
    if not log.handlers:
        log.addHandler(logging.NullHandler())


def _run_log_path(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / TRAIN_LOG


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in log.handlers if isinstance(h, logging.FileHandler)]


class _RunLogHandler(logging.FileHandler):
    """train.log. A write the machine refuses (disk full, permission, read-only) stops the run with the one-line
    answer, raised from the logging call, instead of logging's own traceback on stderr at every later line; the
    handler leaves the logger first, so nothing tries that file again (not even the final error line)."""

    def handleError(self, record: logging.LogRecord) -> None:
        from .errors import CHECKPOINTS_KEPT, as_user_error

        failure = sys.exc_info()[1]
        answer = as_user_error(failure, self.baseFilename, "the run log", CHECKPOINTS_KEPT) if failure else None
        if answer is None:
            super().handleError(record)
            return
        log.removeHandler(self)
        stream, self.stream = self.stream, None
        with contextlib.suppress(OSError):  # closing flushes what the full disk refused: already answered
            stream.close()
        raise answer from failure


def attach_run_log(run_dir: Path) -> logging.Handler | None:
    """Every message of the run also goes to <run>/logs/train.log (appended on resume), starting with the ones
    logged before the run folder existed. None when it already does."""
    path = _run_log_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(Path(h.baseFilename) == path.resolve() for h in _file_handlers()):
        return None
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    h = _RunLogHandler(path, encoding="utf-8")
    h.setFormatter(logging.Formatter(_FILE_FORMAT))
    for backlog in [b for b in log.handlers if isinstance(b, _Backlog)]:
        for record in backlog.records:
            h.handle(record)
        log.removeHandler(backlog)
    log.addHandler(h)
    return h


def run_log_dir() -> Path | None:
    """The logs/ folder of the run whose train.log is attached (the newest one), or None before there is one."""
    handlers = _file_handlers()
    return Path(handlers[-1].baseFilename).parent if handlers else None


def to_run_log(level: int, message: str) -> None:
    """A line for train.log only (the caller has printed it on the terminal already, e.g. the final error)."""
    record = log.makeRecord(log.name, level, "(run)", 0, message, None, None)
    for h in _file_handlers():
        h.handle(record)


def detach_run_logs() -> None:
    """Close every run log of this process (a later in-process run must not write into an earlier run's log)."""
    for h in _file_handlers():
        log.removeHandler(h)
        h.close()


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


# --------------------------------------------------------------------------------------------------
# Progress


class _ProgressLines:
    """tqdm's small interface (iterate, update, set_postfix, close, `with`) as an occasional plain log line."""

    def __init__(self, iterable, desc: str, total: int | None, unit: str, initial: int = 0):
        self.iterable, self.desc, self.unit, self.n = iterable, desc, unit, initial
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""
        self._last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= PROGRESS_LINE_EVERY_S:
            self._last = now
            of = f"/{self.total}" if self.total else ""
            log.info(f"{self.desc}: {self.n}{of} {self.unit}{self.postfix}")

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", disable: bool = False, **kw):
    """A tqdm bar when stderr is a terminal; otherwise a plain log line at most every PROGRESS_LINE_EVERY_S."""
    from tqdm.auto import tqdm

    if disable:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, **kw)
    return _ProgressLines(iterable, desc, total, unit, initial=kw.get("initial", 0))

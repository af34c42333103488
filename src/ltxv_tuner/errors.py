"""The one error type users see. `train.py` prints its message without a traceback."""


class UserError(Exception):
    """An expected failure caused by input (config, files, environment), with the fix in the message."""


MAX_LISTED = 30  # problems listed in one config error (an alias bomb may make thousands)


class ConfigError(UserError):
    """One or more problems in the YAML config or the command-line overrides."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_LISTED]
        more = [f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else []
        lines = "\n".join(f"  - {p}" for p in shown + more)
        super().__init__(f"{len(problems)} problem(s) in the config:\n{lines}")


# --------------------------------------------------------------------------------------------------
# OS and library failures as answers: the one place that knows what ENOSPC, EACCES, EROFS or an OOM look like
# (also when a library wraps them: safetensors "No space left", torch.save "unexpected pos").

_DISK_FULL_TEXT = ("no space left", "disk quota", "unexpected pos", "file write failed", "pytorchstreamwriter failed")
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")
_EARLIER = "files written before it are intact"
CHECKPOINTS_KEPT = "the run stopped; checkpoints written so far are intact"  # a failure while writing a run's logs


def explain_failure(e: BaseException, path=None, what: str | None = None, kept: str = _EARLIER) -> str | None:
    """One line (path, what was being written, that nothing earlier was lost - `kept` -, the fix) for a failure of
    the machine rather than of the code; None for anything else (a bug: the caller shows the traceback file)."""
    import errno

    err = getattr(e, "errno", None)
    text = str(e).lower()
    path = path or getattr(e, "filename", None)
    where = f"{path}: " if path else ""
    doing = f" while writing {what}" if what else ""
    if err in (errno.ENOSPC, errno.EDQUOT) or any(t in text for t in _DISK_FULL_TEXT):
        return (
            f"{where}disk full{doing} ({kept}; a half-written file is never used); free space on that disk "
            "or point output_dir / dataset.data_folder elsewhere, then run the same command again (or --resume latest)"
        )
    if err == errno.EROFS:
        return f"{where}read-only file system{doing} ({kept}); use a writable output_dir / dataset.data_folder"
    if err in (errno.EACCES, errno.EPERM):
        return (
            f"{where}permission denied{doing} ({kept}); give your user write access (chmod/chown) or use another folder"
        )
    if isinstance(e, MemoryError) or err == errno.ENOMEM or any(t in text for t in _OOM_TEXT):
        gpu = "GPU " if "cuda" in text else ""
        return (
            f"out of {gpu}memory{doing} ({kept}); lower training.batch_size or the resolution buckets, or set "
            "training.enable_gradient_checkpointing: true (24 GB GPUs: configs/low_vram_24gb.yaml)"
        )
    return None


class MachineError(UserError):
    """A failure of the machine (disk full, permission, read-only, out of memory), explained in one line."""


def as_user_error(e: BaseException, path=None, what: str | None = None, kept: str = _EARLIER) -> UserError | None:
    msg = explain_failure(e, path, what, kept)
    return MachineError(msg) if msg else None

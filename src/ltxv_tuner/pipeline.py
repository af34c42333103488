"""The stage sequence: preprocess -> train -> convert, each run in its own timestamped folder."""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from .config import Config
from .errors import UserError

log = logging.getLogger("ltxv_tuner")

RUN_PREFIX = "run_"


def quiet_libraries() -> None:
    """diffusers/transformers warn at every load about things users cannot act on (dtype casts of tiny parts);
    torchao (optional, imported by diffusers when installed) warns about CUDA kernels it cannot load on a CPU."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    # torchao registers enums with torch's pytree at import, which torch 2.13 logs as deprecated: not actionable.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
    except ImportError:  # without them the stages fail later with a clear message
        pass


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


def attach_run_log(run_dir: Path) -> logging.Handler:
    """Every message of the run also goes to <run>/logs/train.log (appended on resume)."""
    path = run_dir / "logs" / "train.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    for h in log.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve():
            return h
    h = logging.FileHandler(path, encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(h)
    return h


def _output_dir_error(output_dir: Path, why: str) -> UserError:
    return UserError(
        f"output_dir: cannot create run folders in {output_dir} ({why}); set output_dir to a writable folder"
    )


def check_output_dir(output_dir: Path) -> None:
    """Before any preprocessing: output_dir (or its nearest existing parent) must be a writable folder."""
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise _output_dir_error(output_dir, f"{existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _output_dir_error(output_dir, f"{existing} is not writable")


def new_run_dir(output_dir: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    for i in range(1000):
        path = output_dir / f"{RUN_PREFIX}{stamp}{'' if i == 0 else f'_{i}'}"
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
        except OSError as e:  # a file in the way, no permission, read-only file system
            raise _output_dir_error(output_dir, e.strerror or type(e).__name__) from None
    raise UserError(f"output_dir {output_dir}: could not create a new run folder")


def list_runs(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(RUN_PREFIX))


def _has_checkpoint(run: Path) -> bool:
    ckpt = run / "checkpoints"
    return ckpt.is_dir() and any(p.is_dir() and p.name.startswith("step_") for p in ckpt.iterdir())


def resolve_resume(resume: str, output_dir: Path) -> Path:
    """`latest` = the newest run under output_dir that has a checkpoint; otherwise a run folder that must exist."""
    if resume == "latest":
        runs = [r for r in list_runs(output_dir) if _has_checkpoint(r)]
        if not runs:
            raise UserError(
                f"--resume latest: no run with a checkpoint under {output_dir}/ "
                "(start without --resume, or pass a run folder)"
            )
        return runs[-1]
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such run folder (pass outputs/run_YYYYMMDD_HHMMSS or 'latest')")
    if not (path / "checkpoints").is_dir():
        raise UserError(f"--resume {resume}: not a run folder (it has no checkpoints/ folder)")
    return path


def resolve_convert_target(run_dir: str | None, output_dir: Path) -> Path:
    if run_dir:
        path = Path(run_dir)
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "no such folder"
            raise UserError(f"--run-dir {run_dir}: {what} (pass a run folder, e.g. outputs/run_YYYYMMDD_HHMMSS)")
    else:
        runs = [r for r in list_runs(output_dir) if _has_checkpoint(r)]
        if not runs:
            raise UserError(f"--only convert: no run with a checkpoint under {output_dir}/ (pass --run-dir PATH)")
        path = runs[-1]
    # Checked here, before the run log is attached: a wrong folder must not get a logs/ folder written into it.
    if not (path / "checkpoints").is_dir():
        raise UserError(f"{path}: no checkpoints/ folder; pass a run folder (outputs/run_YYYYMMDD_HHMMSS)")
    return path


def _preflight(cfg: Config) -> None:
    """Sequence length per bucket and the memory estimate, before any work (architecture known without weights)."""
    from . import models, preflight, tiny

    src = models.resolve_model_source(cfg.model)
    if src.kind == "tiny":
        tcfg = dict(tiny.TINY_TRANSFORMER_CONFIG)
    elif src.kind == "named":
        tcfg = models.transformer_config(src.version)
    else:
        # A local file or folder: read its header now, so a wrong file fails before any download or encoding.
        tcfg = models.local_transformer_config(cfg.model)
    preflight.report(cfg, tcfg)
    _warn_ineffective_settings(cfg)


def _warn_ineffective_settings(cfg: Config) -> None:
    """Settings that are valid but will not do what the user likely expects: say so before hours of work."""
    t, v, c = cfg.training, cfg.validation, cfg.checkpoints
    if v.interval is not None and v.interval > t.steps:
        log.warning(
            f"warning: validation.interval {v.interval} > training.steps {t.steps}: no validation video will be made "
            f"(set validation.interval <= {t.steps})"
        )
    if c.interval is not None and c.interval > t.steps:
        log.info(f"note: checkpoints.interval {c.interval} > training.steps {t.steps}: only the final checkpoint")


def _check_resume(resume: str, output_dir: Path, cfg: Config) -> tuple[Path, Path, int]:
    """(run folder, checkpoint, its step); refuses a missing or incompatible target before anything is touched."""
    from . import checkpoints as ckpts

    target = resolve_resume(resume, output_dir)
    ckpt = ckpts.resolve_resume_checkpoint(target)
    done = ckpts.check_resume_compatible(ckpt, cfg.model_dump(mode="json")).get("step", 0)
    if done > cfg.training.steps:  # else the run's config.yaml would claim fewer steps than it has
        raise UserError(
            f"--resume: {ckpt} is at step {done}, past training.steps={cfg.training.steps}; "
            f"pass training.steps={done} (nothing more to train) or higher to train longer"
        )
    return target, ckpt, done


def _stage_preprocess(cfg: Config) -> Path:
    from .preprocess import run_preprocess

    log.info("== stage 1/3: preprocess ==")
    return run_preprocess(cfg)


def _stage_convert(run_dir: Path) -> list[Path]:
    from .convert import convert_run

    log.info("== stage 3/3: convert to ComfyUI ==")
    written = convert_run(run_dir)
    log.info(f"convert: {len(written)} ComfyUI file(s) written")
    return written


def run(
    cfg: Config,
    config_path: Path | None = None,
    only: str | None = None,
    resume: str | None = None,
    run_dir: str | None = None,
) -> Path | None:
    """Run the stages the config and flags ask for. Returns the run folder (None for `--only preprocess`)."""
    setup_console_logging()
    output_dir = Path(cfg.output_dir).expanduser()  # as data_folder: `~/runs` in a YAML is the home folder

    if only == "convert":
        target = resolve_convert_target(run_dir, output_dir)
        attach_run_log(target)
        _stage_convert(target)
        return target
    if resume and only == "preprocess":
        raise UserError("--resume goes with training; drop it or drop --only preprocess")

    started = time.time()
    from .training import check_acceleration, check_tracker

    check_acceleration(cfg)  # before preprocessing: an option that cannot run should not cost an encode first
    check_tracker(cfg)
    if only != "preprocess" and not resume:
        check_output_dir(output_dir)
    resume_target = _check_resume(resume, output_dir, cfg) if resume else None  # before an encode, too
    if only != "preprocess" and cfg.validation.interval:
        from .validation import load_images

        load_images(cfg)  # a missing first-frame image must not surface only at the first validation, hours in
    _preflight(cfg)
    if only == "train":
        from .preprocess import find_manifest

        manifest = find_manifest(cfg)
    else:
        manifest = _stage_preprocess(cfg)
    if only == "preprocess":
        return None

    # Resolve where the run lives (a new timestamped folder, or the one being resumed).
    if resume_target is not None:
        target, ckpt, done = resume_target
        attach_run_log(target)
        log.info(f"resuming run {target} from {ckpt.name}")
        if done == cfg.training.steps:
            log.info(f"the run already reached training.steps={done}: nothing to train (raise it to train longer)")
    else:
        target = new_run_dir(output_dir)
        for sub in ("checkpoints", "validation", "logs"):
            (target / sub).mkdir(exist_ok=True)
        attach_run_log(target)
        log.info(f"run folder: {target}")
    (target / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    if config_path is not None:
        log.info(f"config: {config_path} (resolved copy in {target / 'config.yaml'})")

    from .training import train

    log.info("== stage 2/3: train ==")
    result = train(cfg, target, manifest, resume_from=target if resume else None)

    twins: list[Path] = []
    if cfg.checkpoints.auto_convert_to_comfy and only is None:
        twins = _stage_convert(target)
    elif only is None:
        log.info("convert: skipped (checkpoints.auto_convert_to_comfy is false; run --only convert later)")

    _print_summary(target, result, twins, time.time() - started)
    return target


def _print_summary(run_dir: Path, result, twins: list[Path], wall: float) -> None:
    lines = ["", "== done ==", f"run folder:  {run_dir}", f"steps:       {result.final_step}"]
    if result.final_loss is not None:
        lines.append(f"final loss:  {result.final_loss:.4f}")
    lines.append(f"wall time:   {wall:.1f} s")
    for ckpt in result.checkpoints:
        lines.append(f"weights:     {ckpt}")
        twin = ckpt.with_name(ckpt.stem + "_comfy.safetensors")
        if twin.exists():
            lines.append(f"  ComfyUI:   {twin}")
    log.info("\n".join(lines))

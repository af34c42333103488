"""The stage sequence: preprocess -> train -> convert, each run in its own timestamped folder.

`run` reads like a table of contents: checks, stage 1, the run folder, stage 2, stage 3, the summary. The work
lives in the stage modules; every check made before any work lives in `preflight.py`; run folders and
checkpoints in `checkpoints.py`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from . import checkpoints as ckpts
from . import locks, preflight
from .config import Config
from .logs import attach_run_log, setup_console_logging

log = logging.getLogger("ltxv_tuner")


def run(
    cfg: Config,
    config_path: Path | None = None,
    only: str | None = None,
    resume: str | None = None,
    run_dir: str | None = None,
) -> Path | None:
    """Run the stages the config and flags ask for. Returns the run folder (None for `--only preprocess`)."""
    setup_console_logging()
    preflight.check_flags(only, resume, run_dir)
    output_dir = Path(cfg.output_dir).expanduser()  # as data_folder: `~/runs` in a YAML is the home folder
    if only == "convert":
        target = ckpts.resolve_convert_target(run_dir, output_dir)
        attach_run_log(target)
        log.info(f"run folder: {target}")
        stage_convert(target)
        return target

    started = time.time()
    if only == "preprocess" and cache_complete(cfg):
        return None
    resume_target = preflight.check(cfg, only=only, resume=resume)
    with contextlib.ExitStack() as held:
        if resume_target is not None:  # a second resume of this run is refused before it preprocesses anything
            held.enter_context(locks.run_lock(resume_target.run_dir))
        manifest = find_cache(cfg) if only == "train" else stage_preprocess(cfg, reuse_checked=only == "preprocess")
        if only == "preprocess":
            return None
        if resume_target is not None:
            preflight.check_resume_data(resume_target, manifest)
        target = open_run(cfg, output_dir, resume_target, config_path)
        held.enter_context(locks.run_lock(target))  # re-entrant when resuming
        result = stage_train(cfg, target, manifest, resume_target.checkpoint if resume_target else None)
        _convert_after_training(cfg, target, only)
    print_summary(target, result, time.time() - started)
    return target


def _convert_after_training(cfg: Config, target: Path, only: str | None) -> None:
    if cfg.checkpoints.auto_convert_to_comfy and only is None:
        stage_convert(target)
    elif only is None:
        log.info("convert: skipped (checkpoints.auto_convert_to_comfy is false; run --only convert later)")


def cache_complete(cfg: Config) -> bool:
    """`--only preprocess`: True (reported) when the cache is complete for this config. The checks before it and
    the cache check need no model: with a CPU-only torch, a run with nothing to do never imports torch."""
    from .preprocess import reuse_cache

    preflight.check_settings(cfg, only="preprocess")
    return reuse_cache(cfg) is not None


def find_cache(cfg: Config) -> Path:
    """`--only train`: the manifest preprocessing left for these settings (refused when stale)."""
    from .preprocess import find_manifest

    return find_manifest(cfg)


def stage_preprocess(cfg: Config, reuse_checked: bool = False) -> Path:
    from .preprocess import run_preprocess

    log.info("== stage 1/3: preprocess ==")
    return run_preprocess(cfg, reuse_checked=reuse_checked)


def open_run(cfg: Config, output_dir: Path, resume: preflight.ResumeTarget | None, config_path: Path | None) -> Path:
    """The run folder (a new timestamped one, or the one being resumed), its log, and its resolved config.yaml."""
    if resume is not None:
        target = resume.run_dir
        attach_run_log(target)
        log.info(f"resuming run {target} from {resume.checkpoint.name}")
        if resume.step == cfg.training.steps:
            log.info(
                f"the run already reached training.steps={resume.step}: nothing to train (raise it to train longer)"
            )
    else:
        target = ckpts.new_run_dir(output_dir)
        attach_run_log(target)
        log.info(f"run folder: {target}")
    (target / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    if config_path is not None:
        log.info(f"config: {config_path} (resolved copy in {target / 'config.yaml'})")
    return target


def stage_train(cfg: Config, run_dir: Path, manifest: Path, checkpoint: Path | None = None):
    """Train the run; `checkpoint`: the one to resume from (the newest of the run, or the one --resume named)."""
    from . import launch

    log.info("== stage 2/3: train ==")
    return launch.train(cfg, run_dir, manifest, resume_from=checkpoint)


def stage_convert(run_dir: Path) -> list[Path]:
    from .convert import convert_run

    log.info("== stage 3/3: convert to ComfyUI ==")
    result = convert_run(run_dir)
    log.info(result.summary())
    return result.written


def print_summary(run_dir: Path, result, wall: float) -> None:
    lines = ["", "== done ==", f"run folder:  {run_dir}", f"steps:       {result.final_step}"]
    if result.final_loss is not None:
        lines.append(f"final loss:  {result.final_loss:.4f}")
    lines.append(f"wall time:   {wall:.1f} s")
    for weights in result.checkpoints:
        lines.append(f"weights:     {weights}")
        twin = ckpts.twin_path(weights)
        if twin.exists():
            lines.append(f"  ComfyUI:   {twin}")
    log.info("\n".join(lines))

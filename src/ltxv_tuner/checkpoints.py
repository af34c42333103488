"""Checkpoint folders of a run: names, finding the newest complete one, pruning, resume compatibility.

<run_dir>/checkpoints/step_000250/
    ltxv_lora_step_000250.safetensors | ltxv_transformer_step_000250.safetensors   (exported weights)
    state/                      accelerate save_state (optimizer, scheduler, RNG) + trainable.safetensors
    state/training_state.json   global step, data position and the config the run trained with

A checkpoint is built in `.tmp_step_000250/` and renamed when complete, so a `step_*` folder is always
whole: a run killed while saving leaves only a temp folder, which is ignored and cleaned up next time.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

from .errors import UserError

CHECKPOINTS_DIR = "checkpoints"
STATE_DIR = "state"
TRAINING_STATE_FILE = "training_state.json"
TRAINABLE_FILE = "trainable.safetensors"
_STEP_RE = re.compile(r"^step_(\d{6,})$")
_TMP_PREFIX = ".tmp_step_"

# What must be the same between the run that saved a checkpoint and the one resuming from it:
# anything that changes the set or meaning of the trained weights, or what the data order is built from.
RESUME_MUST_MATCH = (
    "model.model_source",
    "model.training_mode",
    "lora.rank",
    "lora.alpha",
    "lora.target_modules",
    "dataset.resolution_buckets",
)


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / step_dir_name(step)


def temp_checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"{_TMP_PREFIX}{step:06d}"


def weights_file_name(training_mode: str, step: int) -> str:
    kind = "lora" if training_mode == "lora" else "transformer"
    return f"ltxv_{kind}_step_{step:06d}.safetensors"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / STATE_DIR / TRAINING_STATE_FILE).is_file()


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def weight_files(run_dir: Path) -> list[Path]:
    """Exported weight files of the run's complete checkpoints, oldest first (no ComfyUI twins, no state/)."""
    files = []
    for _, ckpt in list_checkpoints(run_dir):
        files += sorted(p for p in ckpt.glob("ltxv_*_step_*.safetensors") if not p.stem.endswith("_comfy"))
    return files


def remove_temp_checkpoints(run_dir: Path) -> None:
    """Half-written checkpoints left by a killed run."""
    root = checkpoints_root(run_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(_TMP_PREFIX) and child.is_dir():
                shutil.rmtree(child)


def prune_checkpoints(run_dir: Path, keep_last_n: int) -> list[Path]:
    """Delete the oldest complete checkpoints beyond keep_last_n (-1 keeps all; the newest is never deleted)."""
    if keep_last_n < 0:
        return []
    ckpts = list_checkpoints(run_dir)
    doomed = [path for _, path in ckpts[: max(0, len(ckpts) - max(1, keep_last_n))]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def read_training_state(ckpt: Path) -> dict:
    path = ckpt / STATE_DIR / TRAINING_STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the checkpoint's training state ({e}); resume from another run") from None


def resolve_resume_checkpoint(resume_from: Path) -> Path:
    """The checkpoint to continue from: the newest complete one of a run folder (or a step_* folder itself)."""
    resume_from = Path(resume_from)
    if not resume_from.exists():
        raise UserError(f"resume: {resume_from} does not exist (give a run folder such as outputs/run_20250101_120000)")
    if _STEP_RE.match(resume_from.name) and is_complete(resume_from):
        return resume_from
    ckpt = latest_checkpoint(resume_from)
    if ckpt is None:
        raise UserError(
            f"resume: {resume_from} has no complete checkpoint ({CHECKPOINTS_DIR}/step_*/{STATE_DIR}/); "
            "start a new run without --resume"
        )
    return ckpt


def _dotted(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def resume_differences(saved_config: dict, current_config: dict) -> list[str]:
    """`key: saved -> current` for every setting that must not change across a resume."""
    diffs = []
    for key in RESUME_MUST_MATCH:
        if key.startswith("lora.") and _dotted(current_config, "model.training_mode") != "lora":
            continue
        old, new = _dotted(saved_config, key), _dotted(current_config, key)
        if key == "lora.target_modules" and old is not None and new is not None:
            old, new = sorted(old), sorted(new)
        if old != new:
            diffs.append(f"{key}: {old!r} -> {new!r}")
    return diffs


def check_state_files(ckpt: Path) -> None:
    """A step folder copied or synced only in part (or damaged on disk) is refused with the fix, before loading."""
    from .cache import CacheFileError, read_header

    state = ckpt / STATE_DIR
    problems = []
    for name in ("optimizer.bin", "scheduler.bin"):  # torch.save zip archives
        if not (state / name).is_file():
            problems.append(f"{name} is missing")
        elif not zipfile.is_zipfile(state / name):
            problems.append(f"{name} is damaged (not a complete torch file)")
    if not (state / "random_states_0.pkl").is_file():
        problems.append("random_states_0.pkl is missing")
    try:
        read_header(state / TRAINABLE_FILE)
    except CacheFileError:
        problems.append(f"{TRAINABLE_FILE} is {'damaged' if (state / TRAINABLE_FILE).exists() else 'missing'}")
    if problems:
        raise UserError(
            f"resume: {ckpt} is incomplete or damaged ({'; '.join(problems)} in {STATE_DIR}/); "
            "delete that step folder to resume from the checkpoint before it"
        )


def check_resume_compatible(ckpt: Path, current_config: dict) -> dict:
    """Read the checkpoint's training state; raise if the config changed in a way that breaks the resume."""
    state = read_training_state(ckpt)
    check_state_files(ckpt)
    diffs = resume_differences(state.get("config", {}), current_config)
    if diffs:
        raise UserError(
            f"resume: {ckpt} was trained with other settings ({'; '.join(diffs)}); "
            "resume with the original values or start a new run without --resume"
        )
    return state

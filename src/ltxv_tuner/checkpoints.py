"""The run-folder contract, one owner: run folders, step naming, weight files, checkpoint state save/load,
resume and convert targets, pruning.

<output_dir>/run_YYYYMMDD_HHMMSS/
    config.yaml  logs/  validation/step_000250/  checkpoints/step_000250/
<run_dir>/checkpoints/step_000250/
    ltxv_lora_step_000250.safetensors | ltxv_transformer_step_000250.safetensors   (exported weights)
    state/                      accelerate save_state (optimizer, scheduler, RNG) + trainable.safetensors
    state/training_state.json   global step, data position, the config the run trained with, what data it trained
                                on, and a checksum of every other state file (a resume checks them all)

A checkpoint is built in `.tmp_step_000250/` and renamed when complete, so a `step_*` folder is always
whole: a run killed while saving leaves only a temp folder, which is ignored and cleaned up next time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
import zlib
from datetime import datetime
from pathlib import Path

from .cache import CacheFileError, file_checksum, load_tensors, read_header, save_tensors_atomic, write_json_atomic
from .errors import UserError, as_user_error

RUN_PREFIX = "run_"
CHECKPOINTS_DIR = "checkpoints"
VALIDATION_DIR = "validation"
LOGS_DIR = "logs"
STATE_DIR = "state"
COMFY_SUFFIX = "_comfy"  # <weights>_comfy.safetensors: the ComfyUI twin convert writes beside each weight file
DIFFUSERS_SUFFIX = "_diffusers"  # <name>_diffusers.safetensors: what `convert --to-diffusers` writes from a twin
TRAINING_STATE_FILE = "training_state.json"
TRAINABLE_FILE = "trainable.safetensors"
_STEP_RE = re.compile(r"^step_(\d{6,})$")
_TMP_PREFIX = ".tmp_step_"

# What must be the same between the run that saved a checkpoint and the one resuming from it: anything that changes
# the set or meaning of the trained weights, what the data and its order are built from (the data itself is
# compared by its fingerprint, `check_resume_data`), or what the saved optimizer state is. A resume with another
# value is refused naming the setting and both values; every other setting that changed is applied from the next
# step and logged (`resume_changes`, training.py).
RESUME_MUST_MATCH = (
    "model.model_source",
    "model.training_mode",
    "lora.rank",
    "lora.alpha",
    "lora.target_modules",
    "dataset.resolution_buckets",
    "dataset.id_token",
    "dataset.preprocessing.max_text_length",
    "dataset.preprocessing.caption_encoding",
    "dataset.preprocessing.vae_posterior",
    "dataset.preprocessing.vae_tiling",
    "dataset.preprocessing.frame_sampling",
    "dataset.reference_downscale",
    "training.strategy",
    "training.audio",
    "training.sharding",
    "training.batch_size",
    "training.optimizer_type",
    "seed",
)
# Settings added after checkpoints were first written: a checkpoint without them had the default. Other keys a
# checkpoint does not have are not compared (changed data is still caught by its fingerprint).
_RESUME_DEFAULTS = {
    "training.strategy": "text_to_video",
    "training.sharding": "none",
    "training.audio": "auto",
    "dataset.reference_downscale": 1,
}
# Means nothing to a resumed run: the run folder is given (or found under it).
_RESUME_IGNORED = ("output_dir",)
_MISSING = object()


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / step_dir_name(step)


def temp_checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"{_TMP_PREFIX}{step:06d}"


def validation_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / VALIDATION_DIR / step_dir_name(step)


def weights_file_name(training_mode: str, step: int) -> str:
    kind = "lora" if training_mode == "lora" else "transformer"
    return f"ltxv_{kind}_{step_dir_name(step)}.safetensors"


def twin_path(weights: Path) -> Path:
    return weights.with_name(weights.stem + COMFY_SUFFIX + ".safetensors")


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
        files += sorted(p for p in ckpt.glob("ltxv_*_step_*.safetensors") if not p.stem.endswith(COMFY_SUFFIX))
    return files


def convertible_files(run_dir: Path) -> list[Path]:
    """Every .safetensors file under the run's checkpoints/ that convert may read: never under state/, never a
    ComfyUI twin or a `_diffusers` file converted back from one (its twin name would be the original's twin),
    never in a hidden folder (a checkpoint is built in .tmp_step_N/ and renamed when complete)."""
    return [p for p in _checkpoint_files(run_dir) if not p.stem.endswith((COMFY_SUFFIX, DIFFUSERS_SUFFIX))]


def converted_back_files(run_dir: Path) -> list[Path]:
    """`*_diffusers.safetensors` files under checkpoints/: conversions a user made, left alone by convert."""
    return [p for p in _checkpoint_files(run_dir) if p.stem.endswith(DIFFUSERS_SUFFIX)]


def _checkpoint_files(run_dir: Path) -> list[Path]:
    root = checkpoints_root(run_dir)
    files = []
    for path in sorted(root.rglob("*.safetensors")):
        rel = path.relative_to(root)
        if STATE_DIR in rel.parts[:-1] or any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        files.append(path)
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


def _json_checksum(state: dict) -> str:
    body = json.dumps({k: v for k, v in state.items() if k != "checksum"}, sort_keys=True)
    return f"crc32:{zlib.crc32(body.encode()):08x}"


def read_training_state(ckpt: Path) -> dict:
    """The checkpoint's training_state.json, refused in one line when it is damaged or was edited since."""
    path = ckpt / STATE_DIR / TRAINING_STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        why = f"{type(e).__name__}: {str(e)[:80]}"
    else:
        fields = isinstance(state, dict) and all(isinstance(state.get(k), int) for k in ("step", "data_position"))
        if not fields or not isinstance(state.get("config", {}), dict):
            why = "not a training state"
        elif "checksum" in state and state["checksum"] != _json_checksum(state):
            why = "edited since it was written: its checksum differs"
        else:
            return state
    raise UserError(f"resume: {path} is damaged ({why}); {_instead(ckpt)}")


def _step_of(ckpt: Path) -> int | None:
    m = _STEP_RE.match(ckpt.name)
    return int(m.group(1)) if m else None


def _instead(ckpt: Path) -> str:
    """What to do when `ckpt` cannot be resumed from: resume from the newest complete checkpoint before it."""
    step = _step_of(ckpt)
    earlier = [path for s, path in list_checkpoints(ckpt.parent.parent) if step is not None and s < step]
    if earlier:
        return f"resume from the checkpoint before it: --resume {earlier[-1]}"
    return "there is no earlier checkpoint to resume from: start a new run without --resume"


def is_step_dir(path: Path) -> bool:
    """`<run>/checkpoints/step_N`: a checkpoint named as a resume target."""
    path = Path(path)
    return bool(_STEP_RE.match(path.name)) and path.parent.name == CHECKPOINTS_DIR


def resolve_resume_checkpoint(resume_from: Path) -> Path:
    """The checkpoint to continue from: the newest complete one of a run folder (or a step_* folder itself)."""
    resume_from = Path(resume_from)
    if not resume_from.exists():
        raise UserError(f"resume: {resume_from} does not exist (give a run folder such as outputs/run_20250101_120000)")
    if _STEP_RE.match(resume_from.name):
        if not is_complete(resume_from):
            raise UserError(
                f"resume: {resume_from} is not a complete checkpoint (it has no {STATE_DIR}/{TRAINING_STATE_FILE}); "
                f"{_instead(resume_from)}"
            )
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
            return _MISSING
        node = node[part]
    return node


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"training": {"steps": 3}} -> {"training.steps": 3} (lists are values)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_differences(saved_config: dict, current_config: dict) -> list[str]:
    """`key: saved -> current` for every setting that must not change across a resume."""
    diffs = []
    for key in RESUME_MUST_MATCH:
        if key.startswith("lora.") and _dotted(current_config, "model.training_mode") != "lora":
            continue
        old, new = _dotted(saved_config, key), _dotted(current_config, key)
        if old is _MISSING:
            if key not in _RESUME_DEFAULTS:
                continue  # saved before the setting existed: cannot tell
            old = _RESUME_DEFAULTS[key]
        if key == "lora.target_modules" and isinstance(old, list) and isinstance(new, list):
            old, new = sorted(old), sorted(new)
        if old != new:
            diffs.append(f"{key}: {old!r} -> {new!r}")
    old = _dotted(saved_config, "training.mixed_precision_mode")
    if _dotted(current_config, "training.mixed_precision_mode") == "fp16" and old not in ("fp16", _MISSING):
        diffs.append(f"training.mixed_precision_mode: {old!r} -> 'fp16' (the checkpoint has no fp16 loss-scale state)")
    return diffs


def resume_changes(saved_config: dict, current_config: dict) -> list[tuple[str, object, object]]:
    """(key, saved, current) for every setting that changed since the checkpoint and may change: the resumed run
    applies each from its next step. LoRA settings of a full fine-tune are not used, so not listed."""
    refused = set(RESUME_MUST_MATCH) | set(_RESUME_IGNORED)
    full = _dotted(current_config, "model.training_mode") == "full"
    old, new = _flat(saved_config), _flat(current_config)
    return [
        (key, old[key], value)
        for key, value in new.items()
        if key in old and old[key] != value and key not in refused and not (full and key.startswith("lora."))
    ]


def data_fingerprint(clips) -> dict:
    """What a run trains on, in the order its batches are drawn from: each clip's cache keys, which name the exact
    latents, caption features and reference. Recorded in each checkpoint; `check_resume_data` compares it."""
    keys = [[c.latent_key, c.condition_key, c.reference_key] for c in clips]
    return {"clips": len(keys), "checksum": f"crc32:{zlib.crc32(json.dumps(keys).encode()):08x}"}


def check_resume_data(ckpt: Path, state: dict, fingerprint: dict) -> None:
    """A resume on other data (clips added or removed, a caption or a clip changed) is refused: the data position
    saved in the checkpoint would point into another order, and the run would no longer be what it says."""
    saved = state.get("data")
    if not isinstance(saved, dict) or saved == fingerprint:
        return  # a checkpoint from before fingerprints cannot tell
    if saved.get("clips") != fingerprint["clips"]:
        what = f"{saved.get('clips')} clip(s) -> {fingerprint['clips']} clip(s)"
    else:
        what = f"the same {fingerprint['clips']} clip(s) count, but other clips, captions or latents"
    raise UserError(
        f"resume: the training data changed since {ckpt} was written (dataset: {what}); resume with the data it "
        "was trained on, or start a new run without --resume"
    )


def _process_of(name: str) -> int | None:
    """The process a per-process state file belongs to (random_states_1.pkl, sharded_rank1.safetensors); None
    for the files the main process writes for all (optimizer, scheduler, trainable weights)."""
    m = re.search(r"_(?:rank)?(\d+)\.(?:pkl|safetensors)$", name)
    return int(m.group(1)) if m else None


def state_checksums(accelerator, state_dir: Path) -> dict[str, str]:
    """Checksums of a checkpoint's state files (all but training_state.json, which records them), every process
    reading only the files it wrote (the main process also the shared ones); every process gets them all."""
    rank, main = accelerator.process_index, accelerator.is_main_process
    own = {}
    for path in sorted(Path(state_dir).iterdir()):
        owner = _process_of(path.name)
        if path.is_file() and path.name != TRAINING_STATE_FILE and (owner == rank if owner is not None else main):
            own[path.name] = file_checksum(path)
    if accelerator.num_processes == 1:
        return own
    from accelerate.utils import gather_object

    return {name: checksum for part in gather_object([own]) for name, checksum in part.items()}


def check_state_files(ckpt: Path, state: dict | None = None, process: int | None = None) -> None:
    """Refuse, in one line naming the files and the checkpoint to resume from instead, a checkpoint whose state
    files are missing, damaged or edited since it was written (the RNG states included: accelerate would skip a
    damaged one silently). Checked by the checksums training_state.json recorded; a checkpoint from before them by
    the files' structure. `process`: only the files that process reads (each launched process checks its own)."""
    state = read_training_state(ckpt) if state is None else state
    folder = ckpt / STATE_DIR
    recorded = state.get("files")
    if isinstance(recorded, dict):
        problems = _checksum_problems(folder, recorded, process)
    else:
        problems = _structure_problems(folder, int(state.get("num_processes") or 1))
    if problems:
        raise UserError(f"resume: {'; '.join(problems)} in {folder}; {_instead(ckpt)}")


def _checksum_problems(folder: Path, recorded: dict, process: int | None) -> list[str]:
    problems = []
    for name, checksum in sorted(recorded.items()):
        if process is not None and _process_of(name) not in (None, process):
            continue
        if not (folder / name).is_file():
            problems.append(f"{name} is missing")
        elif file_checksum(folder / name) != checksum:
            problems.append(f"{name} is damaged (its checksum differs from the one recorded when it was written)")
    return problems


def _structure_problems(folder: Path, num_processes: int) -> list[str]:
    """Checkpoints written before checksums: complete torch zip archives and safetensors headers."""
    from accelerate.utils.constants import OPTIMIZER_NAME, RNG_STATE_NAME, SCHEDULER_NAME

    from .sharding import shard_file

    sharded = shard_file(folder, 0).exists()  # sharded: weights and optimizer state in per-process shard files
    problems = _shard_problems(folder) if sharded else []
    names = [f"{SCHEDULER_NAME}.bin"] if sharded else [f"{OPTIMIZER_NAME}.bin", f"{SCHEDULER_NAME}.bin"]
    for name in names + [f"{RNG_STATE_NAME}_{rank}.pkl" for rank in range(num_processes)]:  # torch.save zip archives
        if not (folder / name).is_file():
            problems.append(f"{name} is missing")
        elif not zipfile.is_zipfile(folder / name):
            problems.append(f"{name} is damaged (not a complete torch file)")
    try:
        if not sharded:
            read_header(folder / TRAINABLE_FILE)
    except CacheFileError:
        problems.append(f"{TRAINABLE_FILE} is {'damaged' if (folder / TRAINABLE_FILE).exists() else 'missing'}")
    return problems


def _shard_problems(state: Path) -> list[str]:
    from .sharding import saved_process_count, shard_file

    try:
        n = saved_process_count(state) or 0
    except (CacheFileError, KeyError, ValueError):
        return [f"{shard_file(state, 0).name} is damaged"]
    problems = []
    for rank in range(n):
        try:
            read_header(shard_file(state, rank))
        except CacheFileError:
            problems.append(f"{shard_file(state, rank).name} is damaged or missing")
    return problems


def check_process_count(ckpt: Path, state: dict, num_processes: int) -> None:
    """A sharded checkpoint holds one shard file per process: it resumes on the same number of processes only."""
    saved = state.get("num_processes")
    sharded = (state.get("config", {}).get("training") or {}).get("sharding", "none") != "none"
    if sharded and saved != num_processes:
        raise UserError(
            f"resume: {ckpt} is sharded over {saved} processes but this run has {num_processes}; resume with "
            f"training.num_processes={saved} (sharded checkpoints are not resharded)"
        )


def check_resume_compatible(ckpt: Path, current_config: dict, process: int | None = None) -> dict:
    """Read the checkpoint's training state and check its files (those of `process` only, when given); raise if the
    config changed in a way that breaks the resume."""
    state = read_training_state(ckpt)
    check_state_files(ckpt, state, process)
    diffs = resume_differences(state.get("config", {}), current_config)
    if diffs:
        raise UserError(
            f"resume: {ckpt} was trained with other settings ({'; '.join(diffs)}); "
            "resume with the original values or start a new run without --resume"
        )
    return state


# --------------------------------------------------------------------------------------------------
# Run folders


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
    """A new run_YYYYMMDD_HHMMSS/ folder with its checkpoints/ and logs/ (validation/ comes with the first video)."""
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    for i in range(1000):
        path = output_dir / f"{RUN_PREFIX}{stamp}{'' if i == 0 else f'_{i}'}"
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        except OSError as e:  # a file in the way, no permission, read-only file system
            raise _output_dir_error(output_dir, e.strerror or type(e).__name__) from None
        for sub in (CHECKPOINTS_DIR, LOGS_DIR):
            (path / sub).mkdir(exist_ok=True)
        return path
    raise UserError(f"output_dir {output_dir}: could not create a new run folder")


def list_runs(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(RUN_PREFIX))


def has_checkpoint(run: Path) -> bool:
    """Any step folder at all (complete or not): what `latest` and `--only convert` look for."""
    root = checkpoints_root(run)
    return root.is_dir() and any(p.is_dir() and p.name.startswith("step_") for p in root.iterdir())


def resolve_resume_target(resume: str, output_dir: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint) of `--resume`: `latest` = the newest checkpoint of the newest run under output_dir
    that has one; a run folder = its newest checkpoint; `<run>/checkpoints/step_N` = that checkpoint."""
    if resume == "latest":
        runs = [r for r in list_runs(output_dir) if has_checkpoint(r)]
        if not runs:
            raise UserError(
                f"--resume latest: no run with a checkpoint under {output_dir}/ "
                "(start without --resume, or pass a run folder)"
            )
        return runs[-1], resolve_resume_checkpoint(runs[-1])
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such run folder (pass outputs/run_YYYYMMDD_HHMMSS or 'latest')")
    if is_step_dir(path):
        return path.parent.parent, resolve_resume_checkpoint(path)
    if not checkpoints_root(path).is_dir():
        raise UserError(f"--resume {resume}: not a run folder (it has no checkpoints/ folder)")
    return path, resolve_resume_checkpoint(path)


def resolve_convert_target(run_dir: str | None, output_dir: Path) -> Path:
    """The run `--only convert` works on: the one named, or the newest with a checkpoint."""
    if run_dir:
        path = Path(run_dir)
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "no such folder"
            raise UserError(f"--run-dir {run_dir}: {what} (pass a run folder, e.g. outputs/run_YYYYMMDD_HHMMSS)")
    else:
        runs = [r for r in list_runs(output_dir) if has_checkpoint(r)]
        if not runs:
            raise UserError(f"--only convert: no run with a checkpoint under {output_dir}/ (pass --run-dir PATH)")
        path = runs[-1]
    # Checked here, before the run log is attached: a wrong folder must not get a logs/ folder written into it.
    if not checkpoints_root(path).is_dir():
        raise UserError(f"{path}: no checkpoints/ folder; pass a run folder (outputs/run_YYYYMMDD_HHMMSS)")
    return path


# --------------------------------------------------------------------------------------------------
# Saving and loading the training state (through accelerate save_state/load_state)


def _unwrap(model):
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def trainable_state_dict(model) -> dict:
    return {n: p.detach() for n, p in _unwrap(model).named_parameters() if p.requires_grad}


def load_trainable_state_dict(model, path: Path) -> None:
    import torch

    saved = load_tensors(path)
    params = dict(_unwrap(model).named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != wanted:
        missing, extra = sorted(wanted - set(saved)), sorted(set(saved) - wanted)
        raise UserError(
            f"{path}: trained weights do not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
            "resume with the config the run was started with"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device))


def register_state_hooks(accelerator) -> None:
    """accelerate save_state/load_state carry only the trainable weights (not the frozen 13B base) as fp32."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_tensors_atomic(Path(output_dir) / TRAINABLE_FILE, trainable_state_dict(models[0]))
        weights.clear()

    def load_hook(models, input_dir):
        load_trainable_state_dict(models.pop(), Path(input_dir) / TRAINABLE_FILE)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, write_weights, keep_last_n: int) -> Path:
    """Build checkpoints/.tmp_step_N/ (weights + full state) and rename it to step_N/ when complete.
    `write_weights(folder)` writes the exported weight file (main process only); `state` is the JSON training
    state (step, data position, config). Returns the final folder."""
    import logging

    tmp, final = temp_checkpoint_dir(run_dir, step), checkpoint_dir(run_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp / STATE_DIR))
    except Exception as e:  # torch.save on a full disk says only "unexpected pos"
        answer = as_user_error(e, tmp / STATE_DIR, f"the state of checkpoint step {step}")
        if answer is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise answer from e
    accelerator.wait_for_everyone()  # every process has written its RNG state before the folder is renamed
    state = {**state, "files": state_checksums(accelerator, tmp / STATE_DIR)}
    if accelerator.is_main_process:
        write_weights(tmp)
        write_json_atomic(tmp / STATE_DIR / TRAINING_STATE_FILE, {**state, "checksum": _json_checksum(state)})
        if final.exists():  # only when a run is re-trained over its own later steps; the new one wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        removed = prune_checkpoints(run_dir, keep_last_n)
        pruned = f" (pruned {', '.join(p.name for p in removed)})" if removed else ""
        logging.getLogger("ltxv_tuner.checkpoints").info("checkpoint %s%s", final, pruned)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ckpt: Path, current_config: dict) -> dict:
    """Restore weights, optimizer, LR scheduler and RNG states; returns the training state (step, position)."""
    state = check_resume_compatible(ckpt, current_config, accelerator.process_index)
    check_process_count(ckpt, state, accelerator.num_processes)
    accelerator.load_state(str(ckpt / STATE_DIR))
    return state

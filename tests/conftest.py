"""Shared fixtures. Tests run offline on CPU with the tiny model."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "quickstart_data"

# Never reach for the network in tests, whatever the machine has.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Parallel test workers (pytest -n auto) share the cores: one torch thread each, also in the train.py processes
# they start; N workers of N threads each fight over N cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _fresh_ltxv_logging():
    """Each test starts with the package logger as a fresh process has it (entry points called in-process add
    console and run-log handlers)."""
    yield
    from ltxv_tuner.logs import log

    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.propagate = True
    log.setLevel(logging.NOTSET)


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty HF cache and offline mode: nothing may come from the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home"


@pytest.fixture
def quickstart_dir(tmp_path: Path) -> Path:
    """A copy of the bundled example clips, so tests never write a cache into the repo."""
    dst = tmp_path / "data"
    shutil.copytree(EXAMPLES, dst, ignore=shutil.ignore_patterns(".precomputed"))
    return dst


@pytest.fixture
def quickstart_config(tmp_path: Path, quickstart_dir: Path) -> Path:
    """configs/quickstart.yaml pointed at a private data copy and output folder."""
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    raw["dataset"]["data_folder"] = str(quickstart_dir)
    raw["output_dir"] = str(tmp_path / "outputs")
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None):
    """Run `python train.py ...` as a user would; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


# The longest tests (30-75 s each on a 2-core CPU), by name: they start first, so that under `pytest -n auto` the
# workers end together instead of one of them running a long test alone at the end (about a minute less).
LONGEST_FIRST = (
    "test_sharded_run_killed_after_a_checkpoint_resumes_bit_identical",
    "test_every_readme_command_works_in_a_fresh_shell",
    "test_lora_on_a_sharded_base_exports_the_same_lora_format",
    "test_sharded_full_fine_tune_matches_data_parallel_and_exports_the_same_files",
    "test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run",
    "test_two_process_cpu_run_end_to_end_then_resume",
    "test_resume_latest_continues_the_same_run",
    "test_resume_with_fewer_steps_than_the_run_has_is_refused",
    "test_tiny_lora_overfits_one_clip",
    "test_only_stages_and_convert_existing_run",
    "test_quant_int8_two_process_run",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.originalname or item.name, len(rank)))

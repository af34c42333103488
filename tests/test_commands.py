"""The README's commands as a new user types them: in a fresh shell after ./setup.sh, with nothing activated
(no VIRTUAL_ENV, no venv/bin on PATH), in a copy of this checkout whose venv/ is the venv running these tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import av
import pytest
from conftest import REPO

VENV = Path(sys.prefix)  # stands in for the checkout's venv/ (what ./setup.sh makes)
needs_venv = pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the tests do not run from a virtualenv")

# README commands this test does not run, and why (each must still be in the README: the list stays honest).
NOT_RUN = {
    "./setup.sh": "installs packages from the network; its result (venv/) is this test's precondition",
    "./setup.sh --extras": "the same, with the optional packages",
    "venv/bin/python -m pytest -q -n auto": "the test suite this test is part of",
}


def readme_commands(lang: str = "bash") -> list[str]:
    """Every line of the README's ```bash blocks (the literal commands; synopses with placeholders are ```text)."""
    blocks = re.findall(rf"^```{lang}\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), re.M | re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def checkout(tmp_path: Path, with_venv: bool = True) -> Path:
    """A copy of the repository as after `git clone` + `./setup.sh` (venv/ linked to the test venv)."""
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns(
        ".git", "venv", ".venv", "outputs", ".precomputed", "__pycache__", ".pytest_cache", ".ruff_cache",
        "*.egg-info", ".whl", "build", "dist",
    )  # fmt: skip
    shutil.copytree(REPO, repo, ignore=ignore)
    if with_venv:
        (repo / "venv").symlink_to(VENV, target_is_directory=True)
    return repo


def fresh_shell_env() -> dict[str, str]:
    drop = {"VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "PYTHONHOME", "LTXV_TUNER_REEXEC"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    venv_bins = {str(VENV / "bin"), str(REPO / "venv" / "bin")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p.rstrip("/") not in venv_bins)
    return env


def shell(cmd: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=fresh_shell_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def system_python_lacks_packages() -> bool:
    code = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('torch') is None else 1)"
    return shutil.which("python3", path=fresh_shell_env()["PATH"]) is not None and (
        subprocess.run(["python3", "-c", code], env=fresh_shell_env()).returncode == 0
    )


@needs_venv
@pytest.mark.slow
def test_every_readme_command_works_in_a_fresh_shell(tmp_path: Path):
    commands = readme_commands()
    assert set(NOT_RUN) <= set(commands), "NOT_RUN names a command the README no longer shows"
    repo = checkout(tmp_path)
    out = {}
    for cmd in commands:
        if cmd in NOT_RUN:
            continue
        r = shell(cmd, repo)
        assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
        out[cmd] = r.stdout + r.stderr
        assert "\r" not in out[cmd] and "Traceback" not in out[cmd], cmd
    quickstart = out["./train.sh configs/quickstart.yaml"]
    assert "== done ==" in quickstart and "preflight:" in quickstart
    assert "Failed to load" not in quickstart and "UserWarning" not in quickstart  # no library noise
    resume = next(v for k, v in out.items() if "--resume latest" in k)
    assert "note: training.steps 20 -> 30 since the checkpoint" in resume
    convert = next(v for k, v in out.items() if "--only convert" in k)
    assert re.search(r"convert: \S+run_\d{8}_\d{6}: 0 ComfyUI twin\(s\) written, 3 already up to date", convert)

    # The LTX-2 quickstart: sound + video trained (the clip without sound video-only, reported), twins per
    # checkpoint, a validation mp4 with the generated sound.
    ltx2 = out["./train.sh configs/quickstart_ltx2.yaml"]
    assert "sunset.mp4: no usable audio track: trains video-only" in ltx2 and "== done ==" in ltx2
    (ltx2_run,) = (repo / "outputs" / "quickstart_ltx2").glob("run_*")
    rows = [json.loads(line) for line in (ltx2_run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_audio" in r for r in rows) and all("loss_video" in r for r in rows)
    for step in ("step_000010", "step_000020"):
        names = sorted(p.name for p in (ltx2_run / "checkpoints" / step).glob("*.safetensors"))
        assert names == [f"ltxv_lora_{step}.safetensors", f"ltxv_lora_{step}_comfy.safetensors"], names
    (video,) = (ltx2_run / "validation" / "step_000020").glob("*.mp4")
    with av.open(str(video)) as container:
        assert container.streams.video and container.streams.audio

    # `python train.py` with a python that lacks the packages (here: whatever python3 is on PATH) uses venv/.
    r = shell("python3 train.py configs/quickstart.yaml --only convert", repo)
    assert r.returncode == 0 and "already up to date" in r.stdout, r.stdout + r.stderr


@needs_venv
def test_convert_sh_on_a_file_and_its_library_noise(tmp_path: Path):
    """The standalone converter from a fresh shell: no torchao/torch chatter on stderr, only the written path."""
    import torch
    from safetensors.torch import save_file

    repo = checkout(tmp_path)
    lora = tmp_path / "my_lora.safetensors"
    a, b = "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight", "transformer.transformer_blocks.0.attn1.to_q"
    save_file({a: torch.zeros(4, 32), f"{b}.lora_B.weight": torch.zeros(32, 4)}, str(lora))
    r = shell(f"./convert.sh {lora}", repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == str(tmp_path / "my_lora_comfy.safetensors") and r.stderr == ""


def test_without_a_venv_every_entry_says_in_one_line_what_to_do(tmp_path: Path):
    if not system_python_lacks_packages():
        pytest.skip("python3 on PATH has torch: nothing to say there")
    repo = checkout(tmp_path, with_venv=False)
    for cmd in ("python3 train.py configs/quickstart.yaml", "./train.sh configs/quickstart.yaml", "./convert.sh x"):
        r = shell(cmd, repo)
        err = r.stderr.strip()
        assert r.returncode == 2 and r.stdout == "", (cmd, r.stdout, err)
        assert len(err.splitlines()) == 1 and err.startswith("error:") and "./setup.sh" in err, (cmd, err)
    assert not (repo / "outputs").exists()


def test_setup_sh_refuses_unknown_options():
    r = subprocess.run(["bash", str(REPO / "setup.sh"), "--extra"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --extra" in r.stderr and "usage: ./setup.sh" in r.stderr
    r = subprocess.run(["bash", str(REPO / "setup.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--extras" in r.stdout


def test_windows_files_and_examples():
    """cmd.exe misreads labels (goto/call) in LF files: .gitattributes keeps *.bat CRLF on every checkout."""
    assert "*.bat text eol=crlf" in (REPO / ".gitattributes").read_text().splitlines()
    for bat in ("setup.bat", "train.bat", "convert.bat"):
        data = (REPO / bat).read_bytes()
        assert data.count(b"\n") == data.count(b"\r\n") > 0, f"{bat} has LF line endings"
    setup = (REPO / "setup.bat").read_text()
    assert "--extras" in setup and "unknown option" in setup and "USE_SYSTEM_SITE_PACKAGES" in setup
    for line in readme_commands("bat"):  # each names a .bat that exists, with Windows paths
        assert (REPO / line.split()[0]).is_file() and "/" not in line, line
    windows = [line for line in (REPO / "README.md").read_text().splitlines() if "train.bat" in line and "=[" in line]
    assert windows and all("'" not in line.split("train.bat", 1)[1].split("`")[0] for line in windows)

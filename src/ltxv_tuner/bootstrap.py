"""`python train.py` from any shell: without an activated venv it re-executes itself with the project's venv/
(what setup.sh / setup.bat create), and without one it says in one line what to do, instead of a
ModuleNotFoundError. Standard library only: this runs before any dependency can be imported.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

# What the stages import; checked by name only (finding a module does not import it).
REQUIRED = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "yaml", "pydantic", "av")
REEXEC_ENV = "LTXV_TUNER_REEXEC"  # set in the re-executed process: it never re-executes again


def missing_modules() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def venv_python(repo: Path) -> Path | None:
    """venv/'s interpreter (POSIX or Windows layout), when setup made one."""
    for rel in ("venv/bin/python", "venv/Scripts/python.exe"):
        if (repo / rel).is_file():
            return repo / rel
    return None


def _running_in(venv: Path) -> bool:
    try:
        return Path(sys.prefix).resolve() == venv.resolve()
    except OSError:
        return False


def ensure_dependencies(repo: Path, script: Path, argv: list[str]) -> None:
    """Return when this interpreter has every dependency; else re-execute `script argv` with venv/'s python, or
    exit with one line naming the fix."""
    missing = missing_modules()
    if not missing:
        return
    windows = os.name == "nt"
    setup, wrapper = ("setup.bat", "train.bat") if windows else ("./setup.sh", "./train.sh")
    python = venv_python(repo)
    if python is not None and not _running_in(repo / "venv") and os.environ.get(REEXEC_ENV) != "1":
        cmd = [str(python), str(script), *argv]
        env = {**os.environ, REEXEC_ENV: "1"}
        if windows:  # os.exec* on Windows detaches the new process from the console's wait
            sys.exit(subprocess.call(cmd, env=env))
        os.execve(str(python), cmd, env)
    names = ", ".join(missing)
    if python is None:
        message = (
            f"error: this python ({sys.executable}) lacks {names} and there is no venv/ in {repo}: run {setup} once "
            f"(it creates venv/ and installs everything), then {wrapper} CONFIG"
        )
    else:
        message = f"error: {python} lacks {names}: venv/ is incomplete; run {setup} again (it is safe to re-run)"
    print(message, file=sys.stderr)
    sys.exit(2)

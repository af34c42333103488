#!/usr/bin/env bash
# Usage: ./train.sh CONFIG.yaml [key=value ...] [--only preprocess|train|convert] [--resume RUN_DIR|latest]
# Runs train.py with the project's venv/ (made by ./setup.sh); nothing needs activating.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ $# -eq 0 ]; then
    echo "usage: ./train.sh CONFIG.yaml [key=value ...] [--only preprocess|train|convert] [--resume RUN_DIR|latest]"
    echo "  e.g. ./train.sh configs/quickstart.yaml"
    echo "  run ./setup.sh first; ./train.sh --help lists every option"
    exit 2
fi
# venv/ unless another virtualenv or conda env is active (setup.sh installs into that one then).
if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && [ -x "$here/venv/bin/python" ]; then
    PY="$here/venv/bin/python"
else
    PY="$(command -v python3 || command -v python || echo python3)"
fi
# train.py itself falls back to venv/ (or says to run ./setup.sh) when this python lacks the packages.
exec "$PY" "$here/train.py" "$@"

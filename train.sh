#!/usr/bin/env bash
# Usage: ./train.sh CONFIG.yaml [key=value ...] [--only preprocess|train|convert] [--resume latest]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ $# -eq 0 ]; then
    echo "usage: ./train.sh CONFIG.yaml [key=value ...] [--only preprocess|train|convert] [--resume RUN_DIR|latest]"
    echo "  e.g. ./train.sh configs/quickstart.yaml"
    echo "  run ./setup.sh first; python train.py --help lists every option"
    exit 2
fi
# Use the project's venv when setup.sh made one; otherwise whatever python is active.
if [ -f "$here/venv/bin/activate" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
    # shellcheck disable=SC1091
    . "$here/venv/bin/activate"
fi
PY=python
command -v python >/dev/null 2>&1 || PY=python3
exec "$PY" "$here/train.py" "$@"

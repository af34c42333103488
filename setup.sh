#!/usr/bin/env bash
# Create venv/ (unless a virtualenv or conda env is already active) and install everything.
# Safe to re-run. torch is installed only when none is importable, pinned to TORCH_VERSION
# (default 2.13.0); an existing torch (e.g. your CUDA build) is kept and protected from upgrades.
#   CUDA build:  TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ./setup.sh
#   system torch: USE_SYSTEM_SITE_PACKAGES=1 ./setup.sh   (venv sees the torch of your system python)
#   optional features (int8 base weights, TensorBoard): ./setup.sh --extras
#   other python for venv/: PYTHON=python3.12 ./setup.sh
set -euo pipefail
usage="usage: ./setup.sh [--extras]   (env: TORCH_VERSION, TORCH_INDEX_URL, USE_SYSTEM_SITE_PACKAGES=1, PYTHON)"
extras=0
for arg in "$@"; do
    case "$arg" in
        --extras) extras=1 ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) echo "setup: unknown option $arg" >&2; echo "$usage" >&2; exit 2 ;;
    esac
done
cd "$(dirname "${BASH_SOURCE[0]}")"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
    echo "setup: installing into the active environment ${VIRTUAL_ENV:-$CONDA_PREFIX}"
    PY=python
else
    if [ ! -x venv/bin/python ]; then
        base="${PYTHON:-python3}"
        flags=()
        [ "${USE_SYSTEM_SITE_PACKAGES:-0}" = "1" ] && flags+=(--system-site-packages)
        echo "setup: creating venv/ with $($base --version 2>&1)"
        "$base" -m venv "${flags[@]}" venv
    fi
    PY="$PWD/venv/bin/python"
fi

if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
    echo "setup: installing torch==$TORCH_VERSION"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$PY" -m pip install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
    else
        "$PY" -m pip install "torch==$TORCH_VERSION"
    fi
fi

# Pin whatever torch is there now so no dependency can swap it for another build.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PY" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" >"$constraints"
"$PY" -m pip install -r requirements.txt -c "$constraints"
if [ "$extras" = "1" ]; then
    "$PY" -m pip install -r requirements-extras.txt -c "$constraints"
fi
"$PY" -m pip install --no-deps -e .
# A CPU-only torch trains the quickstart but no real model: say which one this is.
"$PY" -c "import torch; gpu = torch.cuda.is_available(); print(f'setup: torch {torch.__version__}: ' + (
    f'GPU {torch.cuda.get_device_name(0)}' if gpu else 'no GPU (CPU only; fine for the quickstart). For GPU '
    'training: uninstall this torch (python -m pip uninstall -y torch), then TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 '
    './setup.sh (pick your CUDA version)'))"
echo "setup: done. Next: ./train.sh configs/quickstart.yaml"

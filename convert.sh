#!/usr/bin/env bash
# Usage: ./convert.sh FILE.safetensors|RUN_DIR [--to-comfy|--to-diffusers] [-o OUT] [--save-dtype bf16]
# The standalone converter (python -m ltxv_tuner.convert) with the project's venv/; nothing needs activating.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
has_packages() {  # names only, nothing imported: fast
    "$1" -c "import sys; from ltxv_tuner.bootstrap import missing_modules; sys.exit(1 if missing_modules() else 0)" \
        >/dev/null 2>&1
}
if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && [ -x "$here/venv/bin/python" ]; then
    PY="$here/venv/bin/python"
else
    PY="$(command -v python3 || command -v python || echo python3)"
    if ! has_packages "$PY" && [ -x "$here/venv/bin/python" ]; then
        PY="$here/venv/bin/python"
    fi
fi
if ! has_packages "$PY"; then
    echo "error: $PY lacks ltxv-tuner's packages: run ./setup.sh once (it creates venv/), then ./convert.sh again" >&2
    exit 2
fi
exec "$PY" -m ltxv_tuner.convert "$@"

#!/usr/bin/env python
"""Preprocess -> train -> convert an LTX-Video LoRA or full fine-tune from one YAML config.

    python train.py configs/quickstart.yaml [key=value ...] [--only preprocess|train|convert] [--resume latest]

Works in any shell: outside an activated venv it re-runs itself with the project's venv/ (made by setup.sh).
See docs/CONFIG.md for the config reference. All the work lives in src/ltxv_tuner/.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
# Run from a checkout without `pip install -e .` too.
sys.path.insert(0, str(REPO / "src"))

from ltxv_tuner.bootstrap import ensure_dependencies  # noqa: E402  (standard library only)

if __name__ == "__main__":
    ensure_dependencies(REPO, REPO / "train.py", sys.argv[1:])
    from ltxv_tuner.cli import main

    sys.exit(main())

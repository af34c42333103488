#!/usr/bin/env python
"""Preprocess -> train -> convert an LTX-Video LoRA or full fine-tune from one YAML config.

    python train.py configs/quickstart.yaml [key=value ...] [--only preprocess|train|convert] [--resume latest]

See docs/CONFIG.md for the config reference. All the work lives in src/ltxv_tuner/.
"""

import sys
from pathlib import Path

# Run from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from ltxv_tuner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

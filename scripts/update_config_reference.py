"""Regenerate the configuration reference in docs/CONFIG.md from the schema (src/ltxv_tuner/config.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ltxv_tuner.config import config_reference_markdown  # noqa: E402

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"

doc = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
text = doc.read_text(encoding="utf-8")
head, rest = text.split(START, 1)
_, tail = rest.split(END, 1)
doc.write_text(f"{head}{START}\n{config_reference_markdown()}\n{END}{tail}", encoding="utf-8")
print(f"updated {doc}")

"""Paths of the fixtures bundled with the package (trained small Qwen2-MoE models, their eval text and
tokenizer): `globe demo` runs on the first; benchmarks of quality at the prototype's expert count use the second.

  FIXTURE_DIR   qwen2moe-tiny      (globe/fixture/qwen2moe-tiny/README.md)
  FIXTURE2_DIR  qwen2moe-upcycled  24 MoE layers x 60 experts, upcycled from a dense model (scripts/train_fixture2.py)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURE_DIR = Path(__file__).parent / "fixture" / "qwen2moe-tiny"
FIXTURE2_DIR = Path(__file__).parent / "fixture" / "qwen2moe-upcycled"


def fixture_path() -> Path:
    if not (FIXTURE_DIR / "config.json").is_file():
        raise FileNotFoundError(f"bundled fixture missing at {FIXTURE_DIR}")
    return FIXTURE_DIR


def fixture_info() -> dict[str, Any]:
    return json.loads((fixture_path() / "training.json").read_text())

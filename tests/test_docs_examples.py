"""Every Python example in README.md and docs/*.md runs as written (issue 12): a block that drifts from the
API fails here. Each file's ```python blocks run in order, in one namespace, in a fresh working directory
(they write under runs/), with one torch thread."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path) -> list[str]:
    return FENCE.findall(path.read_text())


def test_the_readme_has_a_python_example():
    assert blocks(ROOT / "README.md"), "README.md lost its Python API example"


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if blocks(d)], ids=lambda d: d.name)
def test_python_examples_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ns: dict = {"__name__": f"doc_{doc.stem}"}
    try:
        for i, code in enumerate(blocks(doc)):
            exec(compile(code, f"{doc.name}[python block {i}]", "exec"), ns)
    finally:
        torch.set_num_threads(threads)

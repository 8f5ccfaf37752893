"""The scripts in examples/ run as documented on the bundled fixture: fit -> export both formats and deploy
-> compare original and compressed. A script that drifts from the API fails here (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_examples_run_in_order(tmp_path):
    fams = json.loads(run("train_qwen_moe.py", "--out", "fit", "--steps", "20", "--m", "8", cwd=tmp_path))
    assert set(fams) == {"up", "gate"} and all(0 < f["rel_fro_error"] < 1 for f in fams.values())
    out = run("export_and_deploy.py", "--artifacts", "fit", "--out", "dep", cwd=tmp_path)
    assert (tmp_path / "dep-globe" / "config.json").is_file() and (tmp_path / "dep-dense" / "config.json").is_file()
    diff = float(out.split("max |logit difference| globe vs dense export:")[1].split()[0])
    assert diff < 1e-4, out  # both fp32 exports of the same fit: the same logits
    res = json.loads(run("benchmark_model.py", "--compressed", "dep-globe", "--max-tokens", "256", cwd=tmp_path))
    assert res["original"]["perplexity"] > 1 and res["compressed"]["perplexity"] > 1
    assert 0.5 < res["ratios"]["perplexity"] < 2

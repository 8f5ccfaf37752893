"""Benchmark scripts refuse bad command-line input like the `globe` command: one `error:` line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("argv, words", [
    (["bench_eval_memory.py", "--export", "/nonexistent"], "--export"),
    (["bench_eval_memory.py", "--export", str(BENCH.parent / "globe" / "fixture" / "qwen2moe-tiny"),
      "--threads", "100000"], "--threads"),
    (["bench_omp_wait.py", "--rounds", "0"], "--rounds"),
    (["bench_compose.py", "--settings", "4:9"], "--settings"),
    (["bench_compose.py", "--settings", "x"], "--settings"),
    (["bench_compose.py", "--batches", "0"], "--batches"),
])
def test_bad_arguments_exit_2(argv, words, tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:]], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], r.stderr

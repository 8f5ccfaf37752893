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
    (["bench_compose.py", "--bank-dtypes", "fp64"], "--bank-dtypes"),
    (["bench_compose.py", "--out", "/etc/passwd/x.json"], "is a file"),
    (["bench_runtime.py", "--threads", "0"], "--threads"),
    (["bench_runtime.py", "--device", "gpu"], "--device"),
    (["bench_runtime.py", "--out", "/"], "is a directory"),
    (["bench_runtime.py", "--activation", "relu"], "--activation"),
    (["bench_kernels.py", "--rounds", "0"], "--rounds"),
    (["bench_kernels.py", "--support", "9", "--m", "8"], "--support"),
    (["bench_kernels.py", "--activation", "relu"], "--activation"),
    (["bench_kernels.py", "--device", "gpu"], "--device"),
    (["bench_kernels.py", "--batch-sweep", "0"], "--batch-sweep"),
    (["bench_kernels.py", "--zipf", "nan"], "--zipf"),
    (["bench_phi.py", "--activations", "relu"], "--activations"),
    (["bench_phi.py", "--out", "/etc/passwd/x.json"], "is a file"),
    (["bench_fit2.py", "--stage", "report", "--weight-powers", "3"], "--weight-powers"),
    (["bench_fit2.py", "--stage", "report", "--calib-tokens", "1"], "--calib-tokens"),
    (["bench_fit2.py", "--stage", "report", "--results", "."], "holds no grid"),
    (["bench_keep_dense.py", "--budget", "0.3", "--fractions", "0.3"], "--fractions"),
    (["bench_keep_dense.py", "--budget", "0"], "--budget"),
    (["bench_keep_dense.py", "--power", "3"], "--power"),
    (["bench_keep_dense.py", "--scope", "band"], "--scope"),
    (["bench_fit2.py", "--stage", "headline", "--results", "."], "holds no grid"),
])
def test_bad_arguments_exit_2(argv, words, tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:]], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], r.stderr


def test_every_benchmark_script_imports():
    """Each script's imports resolve (bench_kernels.py imported names that had moved modules and nobody ran
    it): one process loads every benchmarks/bench_*.py as a module (their work sits behind __main__)."""
    code = ("import importlib.util, sys, pathlib\n"
            f"d = pathlib.Path({str(BENCH)!r}); sys.path.insert(0, str(d))\n"
            "for f in sorted(d.glob('bench_*.py')):\n"
            "    spec = importlib.util.spec_from_file_location(f.stem, f)\n"
            "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "    print(f.name)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.split()) == len(list(BENCH.glob("bench_*.py")))

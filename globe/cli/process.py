"""Process-wide settings the `globe` CLI applies before any work: oneDNN's primitive cache, glibc's malloc, OpenMP.

Why: at full size (Qwen1.5-MoE-A2.7B, 18.47 GB of weights in a globe export) the issue's target is <= 20 GB
resident in every phase, so what a run adds on top of the weights counts. Two process-level allocators
made resident memory creep up window after window of an eval in cache.mode=none:

- oneDNN (torch's CPU bf16 matmul) caches one primitive per GEMM shape, up to 1024 by default; MoE experts
  see a new row count per expert per call, so the cache keeps growing. Scoring 3 windows of 256 tokens
  grew resident memory by 0.69 GB after load with the default, 0.49 GB with 128 and 0.32 GB with 0
  (benchmarks/results/eval_memory_fullsize.json); 0 made full-size expert GEMMs 1.8-2.0x slower, 128 did
  not (onednn_cache_cpu.json). Read by oneDNN once, at its first primitive.
- glibc malloc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), so
  later tensors of a few MiB (activations, composed blocks of a decode step) come from the heap, where
  freed memory fragments and is not given back. Freezing the threshold at glibc's own default (128 KiB,
  `mallopt(M_MMAP_THRESHOLD)`, as the MALLOC_MMAP_THRESHOLD_ variable would) returns every such tensor
  to the system when freed (benchmarks/bench_eval_memory.py and bench_malloc.py measure both effects).

- OpenMP (torch's CPU thread pool, GNU libgomp) lets its idle threads spin for a while after each parallel
  region by default. On a machine where other processes want the same cores, the spinning threads take
  their time slices: a 30-step fit of the bundled fixture took 103 s instead of 16 s on a busy 2-core
  machine. OMP_WAIT_POLICY=PASSIVE puts idle threads to sleep at once (benchmarks/bench_omp_wait.py
  measures both ways, quiet and loaded: benchmarks/results/omp_wait_cpu.json). Read by libgomp when torch
  loads it, so this runs before torch is imported.

Each is skipped when the user set the corresponding variable (an empty value counts as unset). The Python
API leaves the process alone: set them yourself (docs/runtime.md).
"""

from __future__ import annotations

import ctypes
import os
import sys

ONEDNN_CACHE_CAPACITY = 128  # entries of oneDNN's primitive cache
OMP_WAIT_POLICY: str | None = "PASSIVE"  # None: leave OpenMP's default (benchmarks compare both)
MMAP_THRESHOLD = 128 * 1024  # bytes: glibc's default M_MMAP_THRESHOLD, frozen (no dynamic raise)
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def bound_onednn_cache() -> None:
    """Set ONEDNN_PRIMITIVE_CACHE_CAPACITY to ONEDNN_CACHE_CAPACITY unless the user set it. Read by oneDNN
    at its first primitive, so this runs before any matmul of the process."""
    if not os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"):  # unset or empty (an empty value is no setting)
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(ONEDNN_CACHE_CAPACITY)


def quiet_openmp() -> bool:
    """Set OMP_WAIT_POLICY to OMP_WAIT_POLICY (PASSIVE: idle OpenMP threads sleep instead of spinning) unless
    the user set it (non-empty) or torch is already imported (libgomp read its environment then). True
    when set."""
    if OMP_WAIT_POLICY is None or os.environ.get("OMP_WAIT_POLICY") or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    return True


def bound_malloc(threshold: int = MMAP_THRESHOLD) -> bool:
    """Freeze glibc malloc's mmap threshold at `threshold` bytes (allocations at or above it are mmapped
    and unmapped on free; the dynamic raise is switched off). Skipped, returning False, when the user set
    MALLOC_MMAP_THRESHOLD_ (to a non-empty value) or the C library has no mallopt (not Linux/glibc); True
    when applied."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):  # empty: not a setting
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1

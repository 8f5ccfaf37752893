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

- OpenMP (torch's CPU thread pool, GNU libgomp) lets its idle threads spin about 300,000 rounds after
  each parallel region before they sleep. On a machine where another process wants the same cores, the
  spinning threads take its time slices and their own work waits: `globe demo --fast` next to one busy
  process took 156 s instead of 26 s quiet (a new user saw a fixture fit take 103 s instead of 16 s).
  GOMP_SPINCOUNT=3000 keeps a short spin and then sleeps: next to the busy process 33 s (0.21x the
  default's time; OMP_WAIT_POLICY=PASSIVE 0.19x), and on a quiet machine 0.93x the default's demo time
  and 0.86x its decode speed in `globe eval` (PASSIVE: 0.48x, so the CLI does not use it). Medians of
  benchmarks/bench_omp_wait.py -> benchmarks/results/omp_wait_cpu.json. Read by libgomp when torch
  loads it, so this runs before torch is imported.

Each is skipped when the user set the corresponding variable (an empty value counts as unset). The Python
API leaves the process alone: set them yourself (docs/runtime.md).
"""

from __future__ import annotations

import ctypes
import os
import sys

ONEDNN_CACHE_CAPACITY = 128  # entries of oneDNN's primitive cache
SPIN_COUNT: int | None = 3000  # GOMP_SPINCOUNT: rounds an idle OpenMP thread spins before it sleeps (None: leave)
MMAP_THRESHOLD = 128 * 1024  # bytes: glibc's default M_MMAP_THRESHOLD, frozen (no dynamic raise)
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def bound_onednn_cache() -> None:
    """Set ONEDNN_PRIMITIVE_CACHE_CAPACITY to ONEDNN_CACHE_CAPACITY unless the user set it. Read by oneDNN
    at its first primitive, so this runs before any matmul of the process."""
    if not os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"):  # unset or empty (an empty value is no setting)
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(ONEDNN_CACHE_CAPACITY)


def quiet_openmp() -> bool:
    """Set GOMP_SPINCOUNT to SPIN_COUNT (idle OpenMP threads spin briefly, then sleep) unless the user chose
    a wait behaviour (OMP_WAIT_POLICY or GOMP_SPINCOUNT set, non-empty) or torch is already imported
    (libgomp read its environment then). True when set. Other OpenMP runtimes ignore the variable."""
    if SPIN_COUNT is None or "torch" in sys.modules or any(
            os.environ.get(v) for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        return False
    os.environ["GOMP_SPINCOUNT"] = str(int(SPIN_COUNT))
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

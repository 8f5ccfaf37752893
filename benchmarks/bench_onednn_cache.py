# ruff: noqa  (a flat measurement script, kept as run)
"""bf16 GEMMs of one full-size expert (block 1408x2048, A 1408x704, Down 2048x1408), 8 experts: 40 one-row calls
(decode) and 24 calls with varied row counts (prefill), timed once per process; run it under different
ONEDNN_PRIMITIVE_CACHE_CAPACITY values, alternating, e.g.

    for i in 1 2 3; do for c in 1024 128 0; do ONEDNN_PRIMITIVE_CACHE_CAPACITY=$c python benchmarks/bench_onednn_cache.py; done; done
"""
import os
import time

import torch

torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
d, p, r = 2048, 1408, 704
W = [torch.randn(2*r, d, generator=g).bfloat16() for _ in range(8)]
A = [torch.randn(p, r, generator=g).bfloat16() for _ in range(8)]
D = [torch.randn(d, p, generator=g).bfloat16() for _ in range(8)]
def step(M):
    for e in range(8):
        x = torch.randn(M, d).bfloat16()
        z = x @ W[e].T
        h = z[:, :r] @ A[e].T
        y = h @ D[e].T
t = time.perf_counter()
for M in [1]*40:
    step(M)
dec = time.perf_counter() - t
t = time.perf_counter()
for M in [3, 17, 29, 8, 41, 12, 5, 33, 21, 9, 14, 27]*2:   # varied group sizes like prefill
    step(M)
pre = time.perf_counter() - t
print(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default"), f"decode {dec:.3f} s, varied {pre:.3f} s", flush=True)

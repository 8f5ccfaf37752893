"""Speed of full-size expert bf16 GEMMs under different oneDNN primitive-cache sizes (one process each).

Why: the `globe` CLI sets ONEDNN_PRIMITIVE_CACHE_CAPACITY=128 (memory: benchmarks/bench_eval_memory.py);
this checks what a smaller cache costs. Each child times the GEMMs of 8 full-size experts (block
1408 x 2048, A 1408 x 704, Down 2048 x 1408): 40 one-row calls (decode) and 24 calls of varied row counts
(prefill). Capacities alternate across rounds; oneDNN reads the variable once, at its first primitive.

    python benchmarks/bench_onednn_cache.py    # -> benchmarks/results/onednn_cache_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from usage import Parser

ROOT = Path(__file__).resolve().parents[1]
ROWS = [3, 17, 29, 8, 41, 12, 5, 33, 21, 9, 14, 27] * 2  # rows per expert call, like a prefill's groups


def child(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    d, p, r = 2048, 1408, 704
    W = [torch.randn(2 * r, d, generator=g).bfloat16() for _ in range(8)]
    A = [torch.randn(p, r, generator=g).bfloat16() for _ in range(8)]
    D = [torch.randn(d, p, generator=g).bfloat16() for _ in range(8)]

    def step(M: int) -> None:
        for e in range(8):
            z = torch.randn(M, d).bfloat16() @ W[e].T
            (z[:, :r] @ A[e].T) @ D[e].T

    t = time.perf_counter()
    for _ in range(40):
        step(1)
    decode = time.perf_counter() - t
    t = time.perf_counter()
    for M in ROWS:
        step(M)
    return {"decode_s": decode, "prefill_s": time.perf_counter() - t}


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacities", nargs="+", default=["default", "128", "0"],
                    help="ONEDNN_PRIMITIVE_CACHE_CAPACITY values (default: unset, oneDNN's 1024)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onednn_cache_cpu.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.threads)))
        return
    runs: dict[str, list[dict]] = {c: [] for c in a.capacities}
    for _ in range(a.rounds):
        for c in a.capacities:
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
            env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
            if c != "default":
                env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = c
            out = subprocess.run([sys.executable, __file__, "--child", "--threads", str(a.threads)], env=env,
                                 capture_output=True, text=True, check=True)
            runs[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = a.capacities[0]
    summary = {c: {k: sum(r[k] for r in runs[c]) / sum(r[k] for r in runs[base]) for k in ("decode_s", "prefill_s")}
               for c in a.capacities}
    res = {"threads": a.threads, "rounds": a.rounds, "runs": runs, f"time_over_{base}": summary,
           "loadavg": os.getloadavg()}
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

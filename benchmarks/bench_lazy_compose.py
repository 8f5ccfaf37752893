"""A/B at one full-size Qwen1.5-MoE layer in cache.mode=none: lazy composition vs composing every miss at once.

Why: `kernels.LazyPart` composes the blocks of a call's misses COMPOSE_CHUNK (8) at a time where the grouped
kernel uses them, so a 256-token prefill never holds all 60 blocks (346 MB); this measures what that costs
against composing them all first (chunk larger than the layer). Interleaved rounds, same inputs, outputs
checked bit-identical. Layer: E = 60, d = 2048, p = 1408, r = 704, m = 128 atoms, support 25, bf16, top-4.

    python benchmarks/bench_lazy_compose.py    # -> benchmarks/results/lazy_compose_cpu.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from usage import Parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import globe.runtime.kernels as K  # noqa: E402
from globe.runtime.cache import BankCodes, SlabCache, compose_blocks  # noqa: E402
from globe.runtime.kernels import LayerWeights, active_experts, experts_forward  # noqa: E402

WHOLE = 10**6  # a chunk larger than any layer: every miss composed in one call, as before LazyPart


def layer(E: int, d: int, p: int, r: int, m: int, support: int, dt: torch.dtype):
    g = torch.Generator().manual_seed(0)
    fams = {}
    for f in ("gate", "up"):
        bank = (torch.randn(m, r, d, generator=g) * 0.02).to(dt)
        codes = torch.zeros(E, m)
        for e in range(E):
            codes[e, torch.randperm(m, generator=g)[:support]] = torch.rand(support, generator=g)
        fams[f] = BankCodes.from_dense(bank, codes, dtype=dt)
    A = {f: (torch.randn(E, p, r, generator=g) * 0.03).to(dt) for f in fams}
    down = (torch.randn(E, d, p, generator=g) * 0.03).to(dt)
    lw = LayerWeights(down=down, act_fn=F.silu, compute_dtype=dt, rows={"gate": (0, r), "up": (r, 2 * r)}, A=A)

    def compose(ids, out):
        compose_blocks(fams, lw, 0, ids, out)
    return lw, compose


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lazy_compose_cpu.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    E, d, p, r, m, support, k = 60, 2048, 1408, 704, 128, 25, 4
    dt = torch.bfloat16
    lw, compose = layer(E, d, p, r, m, support, dt)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(a.tokens, d, generator=g).to(dt)
    w, idx = torch.topk(torch.randn(a.tokens, E, generator=g).softmax(-1), k)
    act, counts = active_experts(idx, E)
    secs: dict[int, list[float]] = {K.COMPOSE_CHUNK: [], WHOLE: []}
    outs = {}
    default_chunk = K.COMPOSE_CHUNK
    for _ in range(a.rounds):
        for chunk in (default_chunk, WHOLE):
            K.COMPOSE_CHUNK = chunk
            cache = SlabCache(0, E, (2 * r, d), dt, "cpu", compose)
            t = time.perf_counter()
            outs[chunk] = experts_forward(h, idx, w, lw, cache.lookup(act, counts), "grouped", counts)
            secs[chunk].append(time.perf_counter() - t)
    K.COMPOSE_CHUNK = default_chunk
    ratios = [x / y for x, y in zip(secs[default_chunk], secs[WHOLE])]
    res = {"layer": {"E": E, "d": d, "p": p, "r": r, "m": m, "support": support, "top_k": k, "dtype": "bf16"},
           "tokens": a.tokens, "active_experts": len(act), "threads": a.threads, "rounds": a.rounds,
           "lazy_chunk": default_chunk, "lazy_s": secs[default_chunk], "whole_s": secs[WHOLE],
           "lazy_over_whole": ratios, "bit_identical": bool(torch.equal(outs[default_chunk], outs[WHOLE])),
           "loadavg": os.getloadavg(), "torch": torch.__version__}
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k_: res[k_] for k_ in ("lazy_over_whole", "bit_identical", "active_experts")}))


if __name__ == "__main__":
    main()

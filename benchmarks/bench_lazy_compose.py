# ruff: noqa  (a flat measurement script, kept as run)
"""A/B at one full-size Qwen1.5-MoE layer in cache.mode=none (256 tokens, all 60 experts): the lazy composition
(kernels.LazyPart, COMPOSE_CHUNK=8 blocks at a time) against composing every miss at once; 4 interleaved rounds,
2 threads, prints per-round time ratios and checks the outputs are bit-identical.

    python benchmarks/bench_lazy_compose.py
"""
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)
import torch.nn.functional as F

import globe.runtime.kernels as K
from globe.runtime.cache import BankCodes, SlabCache, compose_blocks
from globe.runtime.kernels import LayerWeights, active_experts, experts_forward

E, d, p, r, m, sup, T, k = 60, 2048, 1408, 704, 128, 25, 256, 4
g = torch.Generator().manual_seed(0)
dt = torch.bfloat16
fams = {}
for f in ("gate", "up"):
    bank = (torch.randn(m, r, d, generator=g) * 0.02).to(dt)
    codes = torch.zeros(E, m)
    for e in range(E):
        codes[e, torch.randperm(m, generator=g)[:sup]] = torch.rand(sup, generator=g)
    fams[f] = BankCodes.from_dense(bank, codes, dtype=dt)
A = {f: (torch.randn(E, p, r, generator=g) * 0.03).to(dt) for f in fams}
down = (torch.randn(E, d, p, generator=g) * 0.03).to(dt)
lw = LayerWeights(down=down, act_fn=F.silu, compute_dtype=dt, rows={"gate": (0, r), "up": (r, 2 * r)}, A=A)
comp = lambda ids, out: compose_blocks(fams, lw, 0, ids, out)
h = torch.randn(T, d, generator=g).to(dt)
logits = torch.randn(T, E, generator=g)
w, idx = torch.topk(logits.softmax(-1), k)
act, counts = active_experts(idx, E)
res = {8: [], 10**6: []}
outs = {}
for rnd in range(4):
    for ch in (8, 10**6):
        K.COMPOSE_CHUNK = ch
        sc = SlabCache(0, E, (2 * r, d), dt, "cpu", comp)
        t = time.perf_counter()
        y = experts_forward(h, idx, w, lw, sc.lookup(act, counts), "grouped", counts)
        res[ch].append(time.perf_counter() - t)
        outs[ch] = y
print({ch: [round(x, 2) for x in v] for ch, v in res.items()}, "equal", torch.equal(outs[8], outs[10**6]))
r_ = [a / b for a, b in zip(res[8], res[10**6])]
print("lazy/eager time ratio per round", [round(x, 3) for x in r_])

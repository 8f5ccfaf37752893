"""Micro-benchmark of one routed-experts layer: globe.runtime.kernels paths vs the current loop vs transformers.

Why: the experts layer is where GloBE's bytes differ from the original. At batch-1 decode a layer reads
each active expert's weights once (GloBE: R*d + 2*p*r + d*p numbers, original 2*p*d + d*p: 0.896x at
r = p/2 with Down, 0.843x for Up+Gate alone), so decode measures bytes; prefill (512 tokens) measures
GEMMs plus, in `lru`, composing the misses (nnz*r*d multiply-adds each). Caveat: one layer's weights
(about 1 GB) partly stay in a large L3 cache, so decode here also measures the GEMV kernels' speed on
cached data (mv against mm), not DRAM bytes alone as in a whole model.

Setup: Qwen1.5-MoE-A2.7B sizes (d 2048, E 60, p 1408, top-4), r = p/2, bank m = 16, 4 nonzero codes per
expert, random weights, bf16, one thread. Routing: each token picks top-k experts without replacement
from a fixed Zipf(--zipf) popularity over the experts (the LRU hit rate it gives is reported). Configs
run in paired rounds on the same routing; ratios are per round against transformers' `grouped_mm`
experts (on dense weights of the original shapes, same Down), medians reported.

    python benchmarks/bench_kernels.py [--rounds 5 --decode-tokens 16 --prefill-tokens 512]
writes benchmarks/results/kernels_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from usage import Parser, check_device, check_out, check_threads, cpu_name, die

from globe.artifacts import atomic_write
from globe.maps import ACTIVATIONS, get_activation
from globe.runtime.cache import BankCodes, SlabCache, build_table, compose_blocks, fused_available
from globe.runtime.kernels import Blocks, LayerWeights, active_experts, choose_path, experts_forward
from globe.testing.models import QWEN15_MOE_A27B

OUT = Path(__file__).parent / "results" / "kernels_cpu.json"


def make_layer(args):
    """Random GloBE layer + dense baseline module sharing Down, on args.device."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    g = torch.Generator().manual_seed(0)
    E, d, p = args.experts, QWEN15_MOE_A27B["hidden_size"], QWEN15_MOE_A27B["moe_intermediate_size"]
    r, dt = p // 2, torch.bfloat16
    fams = {}
    for f in ("gate", "up"):
        codes = torch.zeros(E, args.m)
        for e in range(E):
            codes[e, torch.randperm(args.m, generator=g)[:args.support]] = torch.rand(args.support, generator=g) + 0.1
        fams[f] = BankCodes.from_dense(torch.randn(args.m, r, d, generator=g), codes / codes.sum(1, keepdim=True),
                                       gain=0.8, activation=args.activation, dtype=dt)
        fams[f].bank = fams[f].bank.to(args.device)
    rnd = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(args.device, dt)  # noqa: E731
    A = {f: rnd(E, p, r) for f in fams}
    down = rnd(E, d, p)
    lw = LayerWeights(down=down, act_fn=F.silu, compute_dtype=dt, rows={"gate": (0, r), "up": (r, 2 * r)}, A=A)
    cfg = Qwen2MoeConfig(**{**QWEN15_MOE_A27B, "num_experts": E})
    cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        base = Qwen2MoeExperts(cfg)
    base.gate_up_proj = torch.nn.Parameter(rnd(E, 2 * p, d), requires_grad=False)
    base.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return fams, lw, base.eval(), (E, d, p, r)


def routing(n_tokens: int, E: int, k: int, zipf: float, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    pop = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** zipf
    pop = pop[torch.randperm(E, generator=torch.Generator().manual_seed(1))]  # same popularity every seed
    idx = torch.multinomial(pop.expand(n_tokens, E), k, replacement=False, generator=g)
    w = torch.softmax(torch.randn(n_tokens, k, generator=g), -1)
    return idx.to(device), w.to(device, torch.bfloat16)


# ---- the current runtime (globe/runtime/experts.py and cache.py at b32c79d), for comparison -------------
def legacy_compose(fam: BankCodes, i: int, dtype) -> torch.Tensor:
    """FamilyRuntime.compose: full-size fp32 mix, one expert."""
    lo, hi = fam.indptr[i], fam.indptr[i + 1]
    mix = fam.bank[fam.indices[lo]].to(torch.float32, copy=True).mul_(fam.gain * fam.values[lo])
    for j in range(lo + 1, hi):
        mix.add_(fam.bank[fam.indices[j]], alpha=fam.gain * fam.values[j])
    get_activation(fam.activation).fn_(mix)
    return mix.view(fam.r, fam.d).to(dtype)


class LegacyLRU:
    def __init__(self, S, compose):
        self.S, self.compose, self.lru = S, compose, OrderedDict()

    def get(self, e):
        blk = self.lru.get(e)
        if blk is not None:
            self.lru.move_to_end(e)
            return blk
        blk = self.lru[e] = self.compose(e)
        if len(self.lru) > self.S:
            self.lru.popitem(last=False)
        return blk


def legacy_forward(h, top_k_index, top_k_weights, lw: LayerWeights, get_block):
    """GloBEExperts.forward at b32c79d: one GEMM chain per active expert."""
    T, d = h.shape
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=lw.down.shape[0]).tolist()
    x = h.index_select(0, order // k)
    active = [e for e, c in enumerate(counts) if c]
    blocks = [get_block(e) for e in active]
    out = torch.zeros((x.shape[0], d), dtype=lw.down.dtype, device=x.device)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    for e, blk in zip(active, blocks):
        s, t = starts[e], starts[e + 1]
        z = x[s:t] @ blk.T
        proj = {f: z[:, lo:hi] @ lw.A[f][e].T for f, (lo, hi) in lw.rows.items()}
        out[s:t] = (lw.act_fn(proj["gate"]) * proj["up"]) @ lw.down[e].T
    out.mul_(top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(out.dtype))
    res = torch.empty_like(out)
    res[order] = out
    return res.view(T, k, d).sum(dim=1).to(h.dtype)


# ---- configurations ---------------------------------------------------------------------------------
def configs(fams, lw, base, dims, args):
    E, d, p, r = dims
    from transformers.integrations.moe import grouped_mm_experts_forward

    comp = lambda ids, out: compose_blocks(fams, lw, 0, ids, out)  # noqa: E731
    famc = {f: dataclasses.replace(fam, kernel="compiled") for f, fam in fams.items()}  # same bank tensors
    compc = lambda ids, out: compose_blocks(famc, lw, 0, ids, out)  # noqa: E731
    t = time.perf_counter()
    table = build_table(comp, E, (2 * r, d), lw.compute_dtype, args.device)
    _sync(args.device)
    table_s = time.perf_counter() - t
    full = Blocks([table])
    leg_lru = LegacyLRU(args.S, lambda e: torch.cat([legacy_compose(fams[f], e, lw.compute_dtype) for f in lw.rows]))
    slabs = {}

    def lru_call(name, path, compose=comp):  # each LRU configuration keeps its own slab
        slab = slabs[name] = SlabCache(args.S, E, (2 * r, d), lw.compute_dtype, args.device, compose,
                                       collect_stats=True)

        def run(h, i, w):
            act, counts = active_experts(i, E)
            pth = path or choose_path(h.device, h.dtype, i.numel())
            return experts_forward(h, i, w, lw, slab.lookup(act, counts), pth, counts)
        return run

    def full_call(path):
        return lambda h, i, w: experts_forward(h, i, w, lw, full, path or choose_path(h.device, h.dtype, i.numel()))
    S = args.S
    cfgs = {
        "transformers_grouped_mm": lambda h, i, w: grouped_mm_experts_forward(base, h, i, w),
        "current_loop_full": lambda h, i, w: legacy_forward(h, i, w, lw, lambda e: table[e]),
        "full_grouped": full_call("grouped"),
        "full_loop": full_call("loop"),
        "full_gather": full_call("gather"),
        "full_auto": full_call(None),
        f"current_loop_lru{S}": lambda h, i, w: legacy_forward(h, i, w, lw, leg_lru.get),
        f"lru{S}_grouped": lru_call(f"lru{S}_grouped", "grouped"),
        f"lru{S}_auto": lru_call(f"lru{S}_auto", None),
    }
    if args.compile:  # cache.compile: misses composed by the torch.compile'd kernel (CPU)
        cfgs[f"lru{S}_compiled"] = lru_call(f"lru{S}_compiled", None, compc)
    return cfgs, slabs, table_s, compc


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(device, f, *a) -> float:
    _sync(device)
    t = time.perf_counter()
    f(*a)
    _sync(device)
    return time.perf_counter() - t


def _decode(f, hs, idx, w, B: int) -> None:
    """Consecutive decode steps of B tokens each."""
    for j in range(0, hs.shape[0], B):
        f(hs[j:j + B], idx[j:j + B], w[j:j + B])


def _legacy_blocks(fams, lw, ids) -> None:
    for e in ids:
        torch.cat([legacy_compose(fams[f], e, lw.compute_dtype) for f in lw.rows])


@torch.no_grad()
def run(args) -> dict:
    fams, lw, base, dims = make_layer(args)
    E, d, p, r = dims
    cfgs, slabs, table_s, compc = configs(fams, lw, base, dims, args)
    k, dev, B = args.top_k, args.device, args.decode_batch

    def hidden(n, seed):
        return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dev, torch.bfloat16)

    # parity on one 64-token batch before timing (bf16: only the rounding of different GEMM groupings)
    h0, (i0, w0) = hidden(64, 7), routing(64, E, k, args.zipf, 7, dev)
    ref = cfgs["current_loop_full"](h0, i0, w0).float()
    parity = {n: float((f(h0, i0, w0).float() - ref).abs().max() / ref.abs().max())
              for n, f in cfgs.items() if n != "transformers_grouped_mm"}
    # warm every config once; the LRUs on a prefill, then decode steps until they hold a decode working set
    hw, (iw, ww) = hidden(args.prefill_tokens, 99), routing(args.prefill_tokens, E, k, args.zipf, 99, dev)
    hdw, (idw, wdw) = hidden(args.warmup_tokens * B, 98), routing(args.warmup_tokens * B, E, k, args.zipf, 98, dev)
    for n, f in cfgs.items():
        f(hw[:B], idw[:B], wdw[:B])
        if "lru" in n:
            f(hw, iw, ww)
            _decode(f, hdw, idw, wdw, B)
    for slab in slabs.values():
        slab.reset_stats()
    times = {ph: {n: [] for n in cfgs} for ph in ("decode", "prefill")}
    compose_ms = {"compose_blocks": [], "current_compose": []}  # ms per expert, both families
    if args.compile:
        compose_ms["compose_blocks_compiled"] = []
        if not fused_available():  # the warm-up compiled it, or failed: "compiled" rows would be eager ones
            die("--compile: the fused composition kernel does not compile here (see the warning above); "
                "rerun with --no-compile")
    sweep: dict[int, dict[str, list[float]]] = {}
    for rnd in range(args.rounds):
        n_dec = args.decode_tokens
        idx, w = routing(n_dec * B, E, k, args.zipf, 1000 + rnd, dev)
        hs = hidden(n_dec * B, rnd)
        for n, f in cfgs.items():
            times["decode"][n].append(n_dec * B / _timed(dev, _decode, f, hs, idx, w, B))
        hp = hidden(args.prefill_tokens, 50 + rnd)
        ip, wp = routing(args.prefill_tokens, E, k, args.zipf, 2000 + rnd, dev)
        for n, f in cfgs.items():
            if n == "full_gather":
                continue  # one mv (CPU) or gathered block (CUDA) per assignment: a decode path
            times["prefill"][n].append(args.prefill_tokens / _timed(dev, f, hp, ip, wp))
        ids = torch.randperm(E, generator=torch.Generator().manual_seed(rnd))[:8].tolist()
        buf = torch.empty(len(ids), 2 * r, d, dtype=lw.compute_dtype, device=dev)
        compose_ms["compose_blocks"].append(_timed(dev, compose_blocks, fams, lw, 0, ids, buf) * 1e3 / len(ids))
        compose_ms["current_compose"].append(_timed(dev, _legacy_blocks, fams, lw, ids) * 1e3 / len(ids))
        if args.compile:
            compose_ms["compose_blocks_compiled"].append(_timed(dev, compc, ids, buf) * 1e3 / len(ids))
        for Bs in args.batch_sweep:  # where `gather` (one mv / gathered block per assignment) stops paying
            ib, wb = routing(n_dec * Bs, E, k, args.zipf, 3000 + rnd, dev)
            hb = hidden(n_dec * Bs, 70 + rnd)
            for n in ("transformers_grouped_mm", "full_grouped", "full_gather"):
                sweep.setdefault(Bs, {}).setdefault(n, []).append(
                    n_dec * Bs / _timed(dev, _decode, cfgs[n], hb, ib, wb, Bs))
        print(f"round {rnd}: decode " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in times["decode"].items() if v)
              + " tok/s", flush=True)
    out = {}
    for ph, tt in times.items():
        b = tt["transformers_grouped_mm"]
        out[ph] = {n: {"tok_s": statistics.median(v), "ratio": statistics.median([x / y for x, y in zip(v, b)]),
                       "ratio_per_round": [x / y for x, y in zip(v, b)], "runs": v} for n, v in tt.items() if v}
    out["decode_batch_sweep"] = {Bs: {n: statistics.median([x / y for x, y in zip(v, tt["transformers_grouped_mm"])])
                                      for n, v in tt.items()} for Bs, tt in sweep.items()}
    out["compose_ms_per_expert"] = {n: {"median": statistics.median(v), "runs": v} for n, v in compose_ms.items()}
    out["lru_hit_rate_timed"] = {n: sl.stats["hits"] / max(1, sl.stats["hits"] + sl.stats["misses"])
                                 for n, sl in slabs.items()}
    out["parity_max_rel_vs_current_loop"] = parity
    out["full_table_build_s"] = table_s
    return out


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--experts", type=int, default=QWEN15_MOE_A27B["num_experts"])
    ap.add_argument("--top-k", type=int, default=QWEN15_MOE_A27B["num_experts_per_tok"])
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--support", type=int, default=4)
    ap.add_argument("--S", type=int, default=16)
    ap.add_argument("--warmup-tokens", type=int, default=32, help="decode steps filling the LRUs before timing")
    ap.add_argument("--zipf", type=float, default=1.0, help="routing popularity exponent (0 = uniform)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (then write kernels_gpu.json by --out)")
    ap.add_argument("--decode-batch", type=int, default=1, help="tokens per decode step")
    ap.add_argument("--batch-sweep", type=int, nargs="*", default=[2, 4, 8],
                    help="extra decode batch sizes for grouped vs gather, ratios only (default 2 4 8; the flag "
                         "with no sizes: no sweep)")
    ap.add_argument("--activation", default="silu", choices=sorted(ACTIVATIONS),
                    help="the bank's phi (bank.activation)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time `lru` with cache.compile (CPU; needs a C++ compiler)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    for flag in ("rounds", "decode_tokens", "prefill_tokens", "experts", "top_k", "m", "support", "S", "decode_batch"):
        if getattr(args, flag) < 1:
            die(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup_tokens < 0 or any(b < 1 for b in args.batch_sweep):
        die("--warmup-tokens must be >= 0 and every --batch-sweep size >= 1")
    if not (args.zipf >= 0 and math.isfinite(args.zipf)):
        die(f"--zipf must be a finite number >= 0, got {args.zipf}")
    if args.support > args.m or args.top_k > args.experts:
        die("--support must be <= --m and --top-k <= --experts")
    check_threads(args.threads)
    check_out(args.out)
    if check_device(args.device).type != "cpu":
        args.compile = False  # the fused kernel is CPU only (the device kernel is already batched)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    res = {"setup": {**{k: v for k, v in vars(args).items() if k != "out"}, "d": QWEN15_MOE_A27B["hidden_size"],
                     "p": QWEN15_MOE_A27B["moe_intermediate_size"], "r": QWEN15_MOE_A27B["moe_intermediate_size"] // 2,
                     "dtype": "bf16", "cpu": cpu_name(),
                     "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                     "torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    res.update(run(args))
    res["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(res, indent=2) + "\n"))
    for ph in ("decode", "prefill"):
        print(ph, {n: round(v["ratio"], 3) for n, v in res[ph].items()})
    print(f"wrote {args.out} in {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

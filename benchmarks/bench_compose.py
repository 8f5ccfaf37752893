"""Composition kernel benchmark: tilde_B_i = phi(g * sum_j alpha_ij B_j), eager vs `cache.compile` (fused).

Why: an `lru` miss, every `none` call and the `full` table build compose tilde_B_i (r x d) from nnz atoms;
at Qwen1.5-MoE-A2.7B sizes this costs more than the expert's own GEMMs, so its speed sets `lru`/`none`
speed (bench_runtime.py). The eager kernel runs one torch op per atom and column chunk; the compiled one
(torch.compile, cache.py `_mix_into`) makes one pass over the atoms per expert.

Setup: r = 704, d = 2048 (Qwen1.5 at r = p/2), random bank and codes, one thread. Per setting (bank m,
nnz per expert, bank dtype) and batch (experts composed per call: 1 = a decode miss, 8 = a `none` chunk,
60 = a layer's table): ms per expert (one family), paired rounds (eager and compiled alternate), medians.
Also: compile time of the first call, and how the compiled bits relate to the eager ones (largest
difference in units of the output dtype's eps times the largest |value|; fraction of elements that
differ).

    python benchmarks/bench_compose.py [--rounds 5 --threads 1]   ->  benchmarks/results/compose_cpu.json
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from usage import Parser, check_out, check_threads, cpu_name, die

from globe.artifacts import atomic_write
from globe.runtime.cache import BankCodes, compose_many, fused_available

OUT = Path(__file__).parent / "results" / "compose_cpu.json"
R, D = 704, 2048


def family(m: int, nnz: int, dtype: torch.dtype, n: int, seed: int = 0) -> BankCodes:
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(n, m)
    for i in range(n):
        codes[i, torch.randperm(m, generator=g)[:nnz]] = torch.rand(nnz, generator=g) + 0.1
    return BankCodes.from_dense(torch.randn(m, R, D, generator=g) * 0.05, codes, gain=0.8, dtype=dtype)


def timed(fam: BankCodes, kernel: str, ids: list[int], out: torch.Tensor) -> float:
    fam.kernel = kernel
    t = time.perf_counter()
    compose_many(fam, ids, out.dtype, out=out[:len(ids)])
    return (time.perf_counter() - t) * 1e3 / len(ids)


def run(args) -> dict:
    res = {}
    for m, nnz in args.settings:
        for name in args.bank_dtypes:
            dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
            n_exp = max(args.batches)
            fam = family(m, nnz, dt, n_exp)
            out = torch.empty(n_exp, R, D, dtype=torch.bfloat16)
            t0 = time.perf_counter()
            timed(fam, "compiled", [0], out)  # first call: compiles (or loads torch's on-disk cache)
            first_s = time.perf_counter() - t0
            if not fused_available():  # the eager kernel ran: "compiled" figures would be eager ones
                die("the fused kernel does not compile here (see the warning above); nothing to compare")
            ids = list(range(n_exp))
            eager = out.clone()
            timed(fam, "eager", ids, eager)
            timed(fam, "compiled", ids, out)
            scale = torch.finfo(out.dtype).eps * eager.float().abs().max().item()
            diff = (out.float() - eager.float()).abs()
            row = {"first_call_s": first_s, "max_diff_eps": diff.max().item() / scale,
                   "frac_elements_differing": (diff > 0).float().mean().item(), "batches": {}}
            for B in args.batches:
                ids = list(range(B))
                runs = {"eager": [], "compiled": []}
                for _ in range(args.rounds):
                    for k in ("eager", "compiled"):
                        runs[k].append(timed(fam, k, ids, out))
                speed = [e / c for e, c in zip(runs["eager"], runs["compiled"])]
                row["batches"][B] = {"eager_ms": statistics.median(runs["eager"]),
                                     "compiled_ms": statistics.median(runs["compiled"]),
                                     "speedup": statistics.median(speed), "speedup_per_round": speed}
                print(f"m {m} nnz {nnz} bank {name} batch {B}: eager {row['batches'][B]['eager_ms']:.2f} ms, "
                      f"compiled {row['batches'][B]['compiled_ms']:.2f} ms per expert "
                      f"({row['batches'][B]['speedup']:.2f}x)", flush=True)
            res[f"m{m}_nnz{nnz}_{name}"] = row
    return res


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 60])
    ap.add_argument("--settings", type=str, nargs="+", default=["16:4", "128:12"],
                    help="m:nnz pairs (atoms per bank : nonzero codes per expert)")
    ap.add_argument("--bank-dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if args.rounds < 1 or args.threads < 1 or any(b < 1 for b in args.batches):
        die("--rounds, --threads and --batches must be >= 1")
    try:
        args.settings = [tuple(int(v) for v in s.split(":")) for s in args.settings]
    except ValueError:
        die(f"--settings: expected m:nnz pairs such as 16:4, got {args.settings}")
    if any(len(s) != 2 or not 1 <= s[1] <= s[0] for s in args.settings):
        die(f"--settings: each m:nnz needs 1 <= nnz <= m, got {args.settings}")
    check_threads(args.threads)
    check_out(args.out)
    need = max(args.batches) * R * D * 2 * 2 + max(m for m, _ in args.settings) * R * D * 4 * 2  # outs + bank
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.8 * avail:
        die(f"--batches/--settings need about {need / 1e9:.1f} GB, {avail / 1e9:.1f} GB available")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    res = {"setup": {"r": R, "d": D, "out_dtype": "bf16", "threads": args.threads, "rounds": args.rounds,
                     "cpu": cpu_name(), "torch": torch.__version__},
           "results": run(args)}
    res["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(res, indent=2) + "\n"))
    print(f"wrote {args.out} in {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

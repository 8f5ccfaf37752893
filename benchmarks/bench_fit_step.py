"""Time per optimisation step at the real Qwen1.5-MoE-A2.7B expert shape (p=1408, d=2048).

A full family has N = 24 layers x 60 = 1440 experts. The step cost depends on the minibatch size,
not on N, so a subset of random bf16 experts is enough to time the step exactly as `fit_family`
runs it (sparse map, mixing, closed-form ridge A refit, residual, backward, Adam, controller over
all N logits). The full-pass evaluation (A refit + error for every expert) scales with N: it is
timed per expert on the subset and extrapolated to 1440, clearly labelled.

    python benchmarks/bench_fit_step.py [--experts 32] [--batch 8 16] [--r 704] [--m 128] [--threads 2]
Writes benchmarks/results/fit_step_cpu.json (or fit_step_<device>.json).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from usage import Parser, cpu_name

from globe.fit.loop import _load, _refit, _residual, evaluate
from globe.fit.model import GlobeParams
from globe.fit.temperature import TempController
from globe.maps import support


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = Parser()
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--p", type=int, default=1408)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--r", type=int, default=704)
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--N_full", type=int, default=1440)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = a.device
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(a.experts, a.p, a.d, generator=g) / a.d ** 0.5).to(torch.bfloat16)
    s = W.float().pow(2).mean((1, 2)).sqrt()
    prm = GlobeParams(torch.randn(a.m, a.r, a.d, generator=g), torch.randn(a.N_full, a.m, generator=g), 1.0).to(dev)
    opt = torch.optim.Adam(prm.parameters(), lr=1e-3)
    ctrl = TempController(1.0, 12, 0.05)
    out = {"shape": {"p": a.p, "d": a.d, "r": a.r, "m": a.m, "N_full": a.N_full, "experts_loaded": a.experts},
           "device": dev, "threads": a.threads, "cpu": cpu_name(),
           "torch": torch.__version__, "steps": {}}
    for bs in a.batch:
        times = []
        for step in range(a.steps + 1):
            sync(dev)
            t = time.perf_counter()
            idx = torch.randperm(a.experts, generator=g)[:bs]
            Wb, L = _load(W, s, idx, None, dev)
            alpha = prm.codes(idx.to(dev), ctrl.T)
            M = prm.compose(alpha)
            with torch.no_grad():
                A = _refit(Wb, M.detach(), L, 1e-4)
            r2, n2 = _residual(Wb, A, M, L, False)
            loss = (r2 / n2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            prm.constrain_logits(1.0)
            with torch.no_grad():
                ctrl.update(float(support(prm.codes(None, ctrl.T)).float().median()))
            sync(dev)
            if step > 0:  # first step is warm-up
                times.append(time.perf_counter() - t)
        out["steps"][str(bs)] = {"step_s_median": sorted(times)[len(times) // 2], "step_s_all": times,
                                 "s_per_expert_in_batch": sorted(times)[len(times) // 2] / bs}
        print(f"batch {bs}: {out['steps'][str(bs)]['step_s_median']:.2f} s/step")
    sync(dev)
    t = time.perf_counter()
    evaluate(W, s, prm, ctrl.T, chunk=8, dev=dev)
    sync(dev)
    ev = time.perf_counter() - t
    out["eval"] = {"measured_s": ev, "experts": a.experts, "s_per_expert": ev / a.experts,
                   "extrapolated_full_eval_s_for_N_full": ev / a.experts * a.N_full,
                   "note": "full evaluation measured on the loaded subset and extrapolated linearly to N_full"}
    bs = a.batch[-1]
    per = out["steps"][str(bs)]["step_s_median"]
    out["plan_example"] = {"batch": bs, "steps": 1000, "eval_every": 100,
                           "est_hours": (1000 * per + 10 * out["eval"]["extrapolated_full_eval_s_for_N_full"]) / 3600,
                           "note": "per family; extrapolated from the measured step and per-expert eval cost"}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    name = "fit_step_cpu.json" if dev == "cpu" else f"fit_step_{dev}.json"
    path = Path(__file__).parent / "results" / name
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

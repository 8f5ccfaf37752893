"""Do the codes train when the batch is much smaller than N? Support and error of each expert against
how recently (and how often) it was sampled, small batches vs full batch, on one family.

At N = 1440 experts (fixture 2, the prototype's layout) and batch 16, each expert's logits are updated
once per epoch of N / batch = 90 steps: 11 times in the README's 1000-step recipe. This script fits one
family (default: the up family of globe/fixture/qwen2moe-upcycled) with each setting in --runs and
records, at every evaluation, the full error and the median/p95 support, and per expert the code
(alpha) change since the previous evaluation; at the end, per expert: error, support, times sampled
and steps since its last sample (`loop.batch_indices` is deterministic, so this is exact).

    python benchmarks/bench_codes2.py [--model DIR] [--family up] [--steps 1000] [--runs NAME=JSON ...]
                                      [--out benchmarks/results/codes_fixture2.json]

A run is NAME=JSON with config overrides, e.g. 'b16={"train": {"batch_size": 16}}'; every run shares
--base (JSON). One torch thread; the load average is recorded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from usage import Parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from globe.artifacts import atomic_write  # noqa: E402
from globe.config import GlobeConfig  # noqa: E402
from globe.fit.loop import batch_indices, fit_family  # noqa: E402
from globe.fixtures import FIXTURE2_DIR  # noqa: E402
from globe.io.checkpoint import Checkpoint  # noqa: E402


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def sample_stats(N: int, steps: int, bs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(times sampled (N,), steps since last sample at the end (N,)) of the fit's batches."""
    count = torch.zeros(N, dtype=torch.long)
    last = torch.full((N,), -1, dtype=torch.long)
    for s in range(steps):
        idx = batch_indices(s, N, bs, seed)
        count[idx] += 1
        last[idx] = s
    return count, steps - 1 - last


def per_expert(W: torch.Tensor, fam) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative error (N,) and support (N,) of the fitted family's experts."""
    err = torch.empty(W.shape[0])
    for a in range(0, W.shape[0], 256):
        idx = torch.arange(a, min(W.shape[0], a + 256))
        Wb = W[idx].float()
        err[idx] = ((Wb - fam.reconstruct(idx)).pow(2).sum((1, 2)) / Wb.pow(2).sum((1, 2)).clamp_min(1e-30)).sqrt()
    return err, (fam.codes != 0).sum(1)


def quantile_rows(x: torch.Tensor, key: torch.Tensor, q: int = 4) -> list[dict]:
    """Mean of x over experts split into q groups by key (ascending)."""
    order = torch.argsort(key.float(), stable=True)
    rows = []
    for part in order.chunk(q):
        rows.append({"key_min": float(key[part].min()), "key_max": float(key[part].max()),
                     "mean": float(x[part].float().mean()), "n": len(part)})
    return rows


def run(W: torch.Tensor, E: int, fam: str, cfg_d: dict) -> dict:
    cfg = GlobeConfig.from_dict(cfg_d)
    recs, codes = [], []
    prev: list[torch.Tensor] = []

    def on_codes(step, c):
        delta = (c - prev[0]).abs().sum(1) if prev else torch.full((c.shape[0],), float("nan"))
        sup = (c > 0).sum(1).float()
        codes.append({"step": step, "support_median": float(sup.median()), "support_p95": float(sup.quantile(0.95)),
                      "support_min": int(sup.min()), "support_max": int(sup.max()),
                      "code_change_l1_median": float(delta.median()), "code_change_l1_p95": float(delta.quantile(0.95))
                      if not torch.isnan(delta).all() else None})
        prev[:] = [c.clone()]

    t = time.time()
    fit = fit_family(W, cfg, fam, log=recs.append, on_codes=on_codes, experts_per_layer=E)
    secs = time.time() - t
    evals = [{"step": r["step"], "rel_fro_error": r["eval_rel_fro_error"], "support_median": r["support_median"],
              "temperature": r["temperature"]} for r in recs if "eval_rel_fro_error" in r]
    for e, c in zip(evals, codes):
        e.update({k: v for k, v in c.items() if k != "step"})
    N = W.shape[0]
    tr = cfg.train
    count, stale = sample_stats(N, fit.metrics["steps_run"], tr.batch_size, tr.seed)
    err, sup = per_expert(W, fit.artifact)
    mt = fit.metrics
    return {"config": cfg_d, "fit_s": secs, "steps_per_s": mt["steps_run"] / max(secs, 1e-9),
            "rel_fro_error": mt["rel_fro_error"], "median_support": mt["median_support"],
            "p95_support": mt["p95_support"], "min_support": mt["min_support"], "max_support": mt["max_support"],
            "best_step": mt["best_step"], "r": mt["r"], "m": mt["m"], "banks": mt["banks"],
            "stored_fraction": mt["stored_params"] / mt["original_params"],
            "times_sampled": {"min": int(count.min()), "max": int(count.max())},
            "error_by_staleness": quantile_rows(err, stale), "support_by_staleness": quantile_rows(sup, stale),
            "error_by_times_sampled": quantile_rows(err, count),
            "expert_error_p50_p95": [float(err.quantile(0.5)), float(err.quantile(0.95))],
            "evals": evals}


def main() -> None:
    ap = Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(FIXTURE2_DIR))
    ap.add_argument("--family", default="up")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--base", default="{}", help="JSON config shared by every run")
    ap.add_argument("--runs", nargs="+", default=['full={"train": {"batch_size": 100000}}',
                                                  'b16={"train": {"batch_size": 16}}'])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "codes_fixture2.json"))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ck = Checkpoint(a.model)
    W = ck.load_family(a.family, torch.float32)
    E = ck.num_experts
    N = W.shape[0]
    base = merge({"train": {"steps": a.steps, "eval_every": max(1, a.steps // 10), "device": "cpu",
                            "checkpoint_every": 10 ** 9, "log_every": 10 ** 9}},
                 json.loads(a.base))
    res = {"model": a.model, "family": a.family, "N": N, "experts_per_layer": E, "p": W.shape[1], "d": W.shape[2],
           "steps": a.steps, "threads": a.threads, "base": base, "loadavg_start": os.getloadavg(), "runs": {}}
    out = Path(a.out)
    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("model") == res["model"] and old.get("family") == a.family:
            res["runs"] = old.get("runs", {})
    for spec in a.runs:
        name, _, js = spec.partition("=")
        cfg_d = merge(base, json.loads(js or "{}"))
        cfg_d["train"]["batch_size"] = min(int(cfg_d["train"].get("batch_size", 64)), N)
        r = run(W, E, a.family, cfg_d)
        r["loadavg_end"] = os.getloadavg()
        res["runs"][name] = r
        print(f"{name}: err {r['rel_fro_error']:.4f} sup {r['median_support']:.0f}/{r['p95_support']:.0f} "
              f"r {r['r']} m {r['m']} G {r['banks']} {r['fit_s']:.0f}s; error by staleness "
              + " ".join(f"{x['mean']:.4f}" for x in r["error_by_staleness"]), flush=True)
        full = res["runs"].get("full")
        if full:
            for rr in res["runs"].values():
                rr["ratio_vs_full_batch"] = rr["rel_fro_error"] / full["rel_fro_error"]
        res["loadavg_end"] = os.getloadavg()
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda q: Path(q).write_text(json.dumps(res, indent=1) + "\n"))
    print(json.dumps({k: {"err": v["rel_fro_error"], "ratio": v.get("ratio_vs_full_batch")}
                      for k, v in res["runs"].items()}, indent=1))


if __name__ == "__main__":
    main()

"""GloBE vs per-expert SVD vs MoBE-style bank on the trained fixture, at matched stored budgets.

Headline: stored budgets ~50% and ~30% of the routed up+gate parameters, full `run_fit` driver
(GloBE + both baselines in the same run), rel Frobenius error per family, fit time, peak RSS.
Ablation (GloBE vs SVD at each config's own budget): m small/medium/large relative to N=64,
r in {p, p/2} where the budget allows, target support in {8, 12, 16}. Perplexities of the
reconstructions (all methods, both budgets, activation-aware included) come from bench_eval.py.

    python benchmarks/bench_fit.py [--steps 1500] [--quick]
Writes benchmarks/results/fit_fixture.json.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from usage import Parser

from globe.config import GlobeConfig
from globe.fit.baselines import svd_error
from globe.fit.budget import rank_for_budget, svd_rank
from globe.fit.loop import fit_family
from globe.fit.run import run_fit
from globe.io.checkpoint import Checkpoint
from globe.testing.models import fixture_path

RES = Path(__file__).parent / "results" / "fit_fixture.json"
BATCH, LR = 64, 0.03
FAMS_ABL = ("up",)  # ablation on the up family only (CPU budget)  # full batch on the fixture's 64 experts per family


def base_cfg(path, out, m, r, support, steps, **extra) -> GlobeConfig:
    d = {"model": {"path": str(path)}, "output_dir": str(out),
         "bank": {"m_up": m, "m_gate": m, "r": r, **extra.get("bank", {})},
         "sparsity": {"target_support": support, **extra.get("sparsity", {})},
         "train": {"steps": steps, "batch_size": BATCH, "lr": LR, "eval_every": 100, "checkpoint_every": 10 ** 6,
                   "baseline_mobe": True,  # ratios vs both baselines: MoBE is opt-in in `globe fit`
                   "log_every": 50, **extra.get("train", {})}}
    return GlobeConfig.from_dict(d)


def headline(path, ck, steps, frac, m, support, tmp) -> dict:
    N, p, d = len(ck.moe_layers) * ck.num_experts, ck.p, ck.hidden_size
    r = rank_for_budget(frac, N, p, d, m, support, r_max=min(p, d))
    out = Path(tmp) / f"head_{frac}"
    t = time.time()
    s = run_fit(base_cfg(path, out, m, r, support, steps), progress=False)
    row = {"budget_target": frac, "m": m, "r": r, "target_support": support, "wall_s": time.time() - t,
           "peak_rss_bytes": s["peak_rss_bytes"], "families": {}}
    for fam in ("up", "gate"):
        f = s["families"][fam]
        sv, mb = s["baselines"]["svd"][fam], s["baselines"]["mobe"][fam]
        row["families"][fam] = {
            "globe": {k: f[k] for k in ("rel_fro_error", "median_support", "p95_support", "stored_params",
                                        "stored_fraction", "svd_floor_rank_r", "prune_error_cost", "fit_time_s",
                                        "init_rel_fro_error", "best_step")},
            "svd": sv, "mobe": mb,
            "ratio_vs_svd": f["rel_fro_error"] / sv["rel_fro_error"],
            "ratio_vs_mobe": f["rel_fro_error"] / mb["rel_fro_error"],
            "targets_met": {"le_0.8x_svd": f["rel_fro_error"] <= 0.8 * sv["rel_fro_error"],
                            "le_0.9x_mobe": f["rel_fro_error"] <= 0.9 * mb["rel_fro_error"],
                            "support_within_1": abs(f["median_support"] - support) <= 1,
                            "finite": math.isfinite(f["rel_fro_error"])}}
    row["artifacts_dir"] = str(out)
    return row


def ablation(ck, W, steps, grid) -> list[dict]:
    rows = []
    N, p, d = W["up"].shape
    for m, r, support in grid:
        if support > m:
            continue
        cfg = GlobeConfig.from_dict({"bank": {"m_up": m, "m_gate": m, "r": r},
                                     "sparsity": {"target_support": support},
                                     "train": {"steps": steps, "batch_size": BATCH, "lr": LR, "eval_every": 100}})
        row = {"m": m, "r": r, "target_support": support}
        for fam in FAMS_ABL:
            t = time.time()
            fit = fit_family(W[fam], cfg, fam)
            mt = fit.metrics
            import globe.fit.init as I
            sv = torch.linalg.svdvals(W[fam] / I.expert_scales(W[fam])[:, None, None])
            k = svd_rank(mt["stored_params"], N, p, d)
            se = svd_error(sv, I.expert_scales(W[fam]), k)
            row[fam] = {"rel_fro_error": mt["rel_fro_error"], "median_support": mt["median_support"],
                        "stored_fraction": mt["stored_params"] / mt["original_params"], "svd_rank": k,
                        "svd_rel_fro_error": se, "ratio_vs_svd": mt["rel_fro_error"] / se,
                        "svd_floor_rank_r": mt["svd_floor_rank_r"], "fit_s": time.time() - t}
        rows.append(row)
        print("ablation", json.dumps(row))
    return rows


def main() -> None:
    ap = Parser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--ablation_steps", type=int, default=1500)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--support", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", nargs="*", default=[])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = fixture_path()
    ck = Checkpoint(path)
    res = json.loads(RES.read_text()) if RES.exists() else {}
    res.pop("perplexity", None)  # measured by bench_eval.py (eval_fixture.json)
    res.update({"model": str(path), "N": len(ck.moe_layers) * ck.num_experts, "p": ck.p, "d": ck.hidden_size,
                "steps": a.steps, "threads": a.threads})
    tmp = tempfile.mkdtemp(prefix="globe_bench_")
    try:
        if "headline" not in a.skip:
            res["headline"] = [headline(path, ck, a.steps, f, a.m, a.support, tmp) for f in (0.5, 0.3)]
            print(json.dumps(res["headline"], indent=1))
            RES.write_text(json.dumps(res, indent=2) + "\n")
        if "ablation" not in a.skip:
            W = {f: ck.load_family(f, torch.float32) for f in ("up", "gate")}
            p = ck.p
            grid = ([(m, p // 2, 8) for m in (8, 16, 32)] + [(16, p // 2, s) for s in (12, 16)]
                    + [(16, p, 8), (32, p // 2, 16)])
            res["ablation"] = {"steps": a.ablation_steps, "families": list(FAMS_ABL),
                               "rows": ablation(ck, W, a.ablation_steps, grid)}
            RES.write_text(json.dumps(res, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    RES.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""GloBE vs per-expert SVD vs MoBE-style bank on the trained fixture, at matched stored budgets.

Headline: stored budgets ~50% and ~30% of the routed up+gate parameters, full `run_fit` driver
(GloBE + both baselines in the same run), rel Frobenius error per family, fit time, peak RSS.
Ablation (GloBE vs SVD at each config's own budget): m small/medium/large relative to N=64,
r in {p, p/2} where the budget allows, target support in {8, 12, 16}. Activation-aware vs
weight-only: perplexity of the reconstructed fixture (W_hat copied into the dense model) on the
second half of eval.txt, calibration on the first half.

    python benchmarks/bench_fit.py [--steps 1500] [--quick]
Writes benchmarks/results/fit_fixture.json.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from globe.artifacts import Artifacts
from globe.config import GlobeConfig
from globe.fit.baselines import svd_error
from globe.fit.budget import rank_for_budget, svd_rank
from globe.fit.loop import fit_family
from globe.fit.run import run_fit
from globe.io.checkpoint import Checkpoint
from globe.models import fixture_path

RES = Path(__file__).parent / "results" / "fit_fixture.json"
BATCH, LR = 64, 0.03
FAMS_ABL = ("up",)  # ablation on the up family only (CPU budget)  # full batch on the fixture's 64 experts per family


def base_cfg(path, out, m, r, support, steps, **extra) -> GlobeConfig:
    d = {"model": {"path": str(path)}, "output_dir": str(out),
         "bank": {"m_up": m, "m_gate": m, "r": r, **extra.get("bank", {})},
         "sparsity": {"target_support": support, **extra.get("sparsity", {})},
         "train": {"steps": steps, "batch_size": BATCH, "lr": LR, "eval_every": 100, "checkpoint_every": 10 ** 6,
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


def ppl(model, ids, ctx=256) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for a in range(0, ids.numel() - 1, ctx):
            x = ids[a:a + ctx + 1]
            if x.numel() < 2:
                break
            out = model(x[None, :-1], labels=x[None, :-1])
            logits = out.logits[0].float()
            nll += float(torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum"))
            n += x.numel() - 1
    return math.exp(nll / n)


def substitute(model, ck, recon: dict) -> None:
    """Copy W_hat (N, p, d) per family into mlp.experts.gate_up_proj (E, 2p, d), gate rows first."""
    E, p = ck.num_experts, ck.p
    with torch.no_grad():
        for li, L in enumerate(ck.moe_layers):
            gu = getattr(model.model.layers[L], ck.spec.block).experts.gate_up_proj
            for fam, lo in (("gate", 0), ("up", p)):
                if fam in recon:
                    gu[:, lo:lo + p] = recon[fam][li * E:(li + 1) * E].to(gu.dtype)


def perplexities(path, ck, steps, m, support, frac, tmp) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    text = (Path(path) / "eval.txt").read_text()
    half = len(text) // 2
    calib = Path(tmp) / "calib.txt"
    calib.write_text(text[:half])
    ids = tok(text[half:], return_tensors="pt")["input_ids"][0]
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    out = {"eval_tokens": int(ids.numel()), "calib": "first half of eval.txt; ppl on the second half",
           "original": ppl(load(), ids)}
    N, p, d = len(ck.moe_layers) * ck.num_experts, ck.p, ck.hidden_size
    r = rank_for_budget(frac, N, p, d, m, support, r_max=min(p, d))
    for obj in ("weight", "activation"):
        o = Path(tmp) / f"ppl_{obj}"
        extra = {"train": {"objective": obj, "calib_text": str(calib), "baselines": False}}
        s = run_fit(base_cfg(path, o, m, r, support, steps, **extra), progress=False)
        arts = Artifacts.load(o)
        model = load()
        substitute(model, ck, {f: arts.families[f].reconstruct() for f in arts.families})
        out[f"globe_{obj}"] = {"ppl": ppl(model, ids),
                               "rel_fro_error": {f: s["families"][f]["rel_fro_error"] for f in s["families"]}}
    # SVD at the weight-only GloBE budget
    k = svd_rank(s["families"]["up"]["stored_params"], N, p, d)
    recon = {}
    for fam in ("up", "gate"):
        Wf = ck.load_family(fam, torch.float32)
        U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)
        recon[fam] = U[:, :, :k] @ torch.diag_embed(S[:, :k]) @ Vh[:, :k]
    model = load()
    substitute(model, ck, recon)
    out["svd_same_budget"] = {"rank": k, "ppl": ppl(model, ids)}
    out["budget_target"], out["m"], out["r"], out["target_support"] = frac, m, r, support
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
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
        if "ppl" not in a.skip:
            res["perplexity"] = perplexities(path, ck, a.steps, a.m, a.support, 0.5, tmp)
            print(json.dumps(res["perplexity"], indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    RES.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

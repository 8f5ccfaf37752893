"""Fixture 2 (qwen2moe-upcycled: 24 MoE layers x 60 experts, N = 1440 per family, p = 40, d = 56):
GloBE at four sharing scopes vs per-expert SVD vs the MoBE-style bank, at matched stored budgets.

Matching: every method stores the same number of parameters per family, within one rank step.
GloBE: at budget b, scope (G banks) and a total number of atoms M (m = M / G per bank), r is the
largest rank whose stored parameters G (m r d + 1) + N p r + nnz stay within b N p d (bank.budget
with bank.r_multiple=1, so the budget is met to ~1.8% at d = 56; the default multiple of 8 would cost
up to 7 ranks at this width). Which M is best is measured (stage `grid`, up family),
separately per scope; the support target is min(16, m / 2) (a dense softmax bank fits this
fixture better than support 8 of 32: measured, see docs/fit.md). The headline then runs each scope at
the rank r of its best grid point with the atoms topped up to fill the budget (the largest M, a
multiple of G, that still fits), so every GloBE run stores the budget to within one atom. The SVD baseline gets rank
k = stored / (N (p + d)) of the GloBE run it is compared with, the MoBE-style bank (one bank of m_l atoms
per layer, dense softmax codes, Adam on everything; globe/fit/baselines.py) the rank r with
L m_l r d + N p r + N m_l closest to the same stored count, at its best m_l of --mobe-m (measured).

Stages (each appends to the JSON files, so they can run separately):
  grid      up family: scope x M at each budget, --batch experts per step, --steps steps. The committed grid
            is full batch (--batch 1440 --steps 600); the headline picks each scope's M from it.
  recipe    the same points at the prototype's recipe (--batch 32 --steps 3000, i.e. 32 of 1440 experts per
            step), optionally with --codes-optimizer row_adam / --code-pass-every K; the report compares each
            with the full-batch grid's error at the same (budget, scope, M) (target: within 2%)
  steps     one point (--budgets/--scopes/--totals) at --batch for each of --steps-list (and --lr), against the
            full-batch grid: how many epochs (steps x batch / N) the small batch needs to come within 2%
  report    markdown tables of all of them -> fit_fixture2.md
  headline  each scope at its best M (both families, `run_fit`, SVD baseline), the MoBE-style bank at its
            best m_l, SVD; relative Frobenius errors, fit times, and the perplexity of each reconstruction
            on the second half of eval.txt (the first half calibrates the activation-aware objective, also
            run here for the best scope with and without train.calib_row_weights), and the best scope with routing
            weights (train.expert_weights=routing, one run per --weight-powers, counts from --calib-tokens of the
            first half: part `routing`)

    python benchmarks/bench_fit2.py --stage grid --batch 1440 --steps 600
    python benchmarks/bench_fit2.py --stage recipe --budgets 0.5 --scopes global --totals 48 384
    python benchmarks/bench_fit2.py --stage headline --budgets 0.5 --scopes group:2 --batch 1440 --steps 600 \
        --mobe-m 8 16 32 --act-row-weights 0
    python benchmarks/bench_fit2.py --stage steps --budgets 0.5 --scopes group:2 --totals 384 --batch 32 \
        --steps-list 3000 9000 18000 27000
    python benchmarks/bench_fit2.py --stage report
Writes benchmarks/results/fit_fixture2.json and eval_fixture2.json. One torch thread; load averages
(`os.getloadavg`) are recorded, since other jobs share this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from usage import Parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_eval import Scorer, rel_err, svd_reconstruct  # noqa: E402

from globe.artifacts import Artifacts, atomic_write  # noqa: E402
from globe.config import GlobeConfig  # noqa: E402
from globe.eval.perplexity import tokenize  # noqa: E402
from globe.fit.baselines import mobe_fit  # noqa: E402
from globe.fit.budget import globe_params, mobe_params, mobe_rank, svd_rank  # noqa: E402
from globe.fit.calib import routing_counts, routing_weights  # noqa: E402
from globe.fit.loop import fit_family  # noqa: E402
from globe.fit.run import run_fit  # noqa: E402
from globe.fit.share import n_banks  # noqa: E402
from globe.fixtures import FIXTURE2_DIR  # noqa: E402
from globe.io.checkpoint import Checkpoint  # noqa: E402

RES = ROOT / "benchmarks" / "results"
FIT_JSON, EVAL_JSON = RES / "fit_fixture2.json", RES / "eval_fixture2.json"
SCOPES = ("global", "group:2", "group:4", "layer")
FAMS = ("up", "gate")


LR = 0.03  # train.lr of every run here (the default); stage `steps` takes --lr


def load(p: Path) -> dict:
    return json.loads(p.read_text()) if p.is_file() else {}


def save(p: Path, obj: dict) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, lambda q: Path(q).write_text(json.dumps(obj, indent=1) + "\n"))


def bank_cfg(share: str, M: int, L: int, budget: float) -> tuple[dict, dict]:
    G = n_banks(share, L)
    m = max(2, M // G)
    return ({"m_up": m, "m_gate": m, "share": share, "budget": budget, "r_multiple": 1},
            {"target_support": max(1, min(16, m // 2))})


def train_cfg(a, N: int, **extra) -> dict:
    return {"steps": a.steps, "batch_size": min(a.batch, N), "lr": LR, "eval_every": max(1, a.steps // 10),
            "device": "cpu", "checkpoint_every": 10 ** 9, "log_every": 10 ** 9, "seed": 0,
            "codes_optimizer": a.codes_optimizer, "code_pass_every": a.code_pass_every,
            "code_pass_steps": a.code_pass_steps, **extra}


def grid(a, ck: Checkpoint, res: dict, key: str = "grid") -> None:
    """key "grid": the scope x M grid the headline picks from; key "recipe": the same points at the
    prototype's batch (--batch 32), compared in the report with the grid's error at the same point."""
    W = ck.load_family("up", torch.float32)
    N, L, E = W.shape[0], len(ck.moe_layers), ck.num_experts
    old = res.get(key)
    if old and (old["steps"], old["batch_size"]) != (a.steps, min(a.batch, N)):  # another schedule: kept aside
        res.setdefault(f"{key}_other_schedules", []).append(old)
        res.pop(key)
    rows = res.setdefault(key, {"family": "up", "steps": a.steps, "batch_size": min(a.batch, N), "rows": []})["rows"]
    opts = (a.codes_optimizer, a.code_pass_every, a.code_pass_steps)
    done = {(r["budget"], r["share"], r["M"], r.get("codes_optimizer", "adam"), r.get("code_pass_every", 0),
             r.get("code_pass_steps", 1)) for r in rows}
    for b in a.budgets:
        for share in a.scopes:
            for M in a.totals:
                if (b, share, M, *opts) in done:
                    continue
                bank, sp = bank_cfg(share, M, L, b)
                cfg = GlobeConfig.from_dict({"bank": bank, "sparsity": sp, "train": train_cfg(a, N)})
                t = time.time()
                try:
                    fit = fit_family(W, cfg, "up", experts_per_layer=E)
                except ValueError as e:  # a budget this scope cannot meet at this M
                    rows.append({"budget": b, "share": share, "M": M, "infeasible": str(e)})
                    continue
                mt = fit.metrics
                rows.append({"budget": b, "share": share, "M": M, "m": mt["m"], "banks": mt["banks"], "r": mt["r"],
                             "target_support": sp["target_support"], "rel_fro_error": mt["rel_fro_error"],
                             "median_support": mt["median_support"], "p95_support": mt["p95_support"],
                             "stored_fraction": mt["stored_params"] / mt["original_params"],
                             "svd_floor_rank_r": mt["svd_floor_rank_r"], "best_step": mt["best_step"],
                             "fit_time_s": time.time() - t, "codes_optimizer": opts[0], "code_pass_every": opts[1],
                             "code_pass_steps": opts[2], "loadavg": os.getloadavg()})
                print(json.dumps(rows[-1]), flush=True)
                save(FIT_JSON, res)


def steps_sweep(a, ck: Checkpoint, res: dict) -> None:
    """Stage `steps`: the recipe's batch (--batch) at each of --steps-list for one (budget, scope, M), each
    against the full-batch grid's error at the same point; epochs = steps x batch / N (how often each
    expert's codes are updated). Rows are keyed by (budget, scope, M, batch, steps, lr); reruns skip them."""
    W = ck.load_family("up", torch.float32)
    N, L, E = W.shape[0], len(ck.moe_layers), ck.num_experts
    full = {(r["budget"], r["share"], r["M"]): r for r in res.get("grid", {}).get("rows", []) if "rel_fro_error" in r}
    rows = res.setdefault("recipe_steps", [])
    done = {(r["budget"], r["share"], r["M"], r["batch_size"], r["steps"], r["lr"]) for r in rows}
    for b in a.budgets:
        for share in a.scopes:
            for M in a.totals:
                for steps in a.steps_list:
                    batch = min(a.batch, N)
                    if (b, share, M, batch, steps, a.lr) in done:
                        continue
                    bank, sp = bank_cfg(share, M, L, b)
                    tr = train_cfg(argparse.Namespace(**{**vars(a), "steps": steps}), N, lr=a.lr)
                    cfg = GlobeConfig.from_dict({"bank": bank, "sparsity": sp, "train": tr})
                    t = time.time()
                    mt = fit_family(W, cfg, "up", experts_per_layer=E).metrics
                    f = full.get((b, share, M))
                    rows.append({"budget": b, "share": share, "M": M, "r": mt["r"], "batch_size": batch,
                                 "steps": steps, "epochs": steps * batch / N, "lr": a.lr,
                                 "rel_fro_error": mt["rel_fro_error"], "best_step": mt["best_step"],
                                 "median_support": mt["median_support"], "fit_time_s": time.time() - t,
                                 "full_batch_error": f["rel_fro_error"] if f else None,
                                 "full_batch_steps": res["grid"]["steps"] if f else None,
                                 "ratio": mt["rel_fro_error"] / f["rel_fro_error"] if f else None,
                                 "loadavg": os.getloadavg()})
                    print(json.dumps(rows[-1]), flush=True)
                    save(FIT_JSON, res)


def best_M(res: dict, b: float, share: str, N: int, p: int, d: int, L: int) -> int:
    """The grid's best setting for this scope, with the atoms topped up to fill the budget at its rank r:
    the largest M (a multiple of G) whose stored parameters at that r stay within b N p d."""
    rows = [r for r in res["grid"]["rows"] if r["budget"] == b and r["share"] == share and "rel_fro_error" in r]
    best = min(rows, key=lambda r: r["rel_fro_error"])
    r, G, M = best["r"], best["banks"], best["M"]
    while True:
        m = (M + G) // G
        sup = bank_cfg(share, m * G, L, b)[1]["target_support"]
        if globe_params(N, p, d, m, r, N * sup, G) > b * N * p * d:
            return M
        M = m * G


def globe_run(a, ck, share, M, b, out, objective="weight", calib=None, row_weights=False, baselines=True,
              power=None, keep: float = 0.0) -> dict:
    """run_fit of one scope; power: train.expert_weights=routing with this train.expert_weight_power; keep:
    bank.keep_fraction (the busiest experts by the calibration text's gate mass kept uncompressed)."""
    N, L = len(ck.moe_layers) * ck.num_experts, len(ck.moe_layers)
    bank, sp = bank_cfg(share, M, L, b)
    if keep:
        bank["keep_fraction"] = keep
    weights = {} if power is None else {"expert_weights": "routing", "expert_weight_power": power,
                                        "calib_tokens": a.calib_tokens}
    tr = train_cfg(a, N, baselines=baselines, objective=objective, calib_text=str(calib) if calib else None,
                   calib_row_weights=row_weights, **weights)
    if keep:
        tr["calib_tokens"] = a.calib_tokens
    cfg = GlobeConfig.from_dict({"model": {"path": str(ck.dir)}, "output_dir": str(out), "bank": bank,
                                 "sparsity": sp, "train": tr})
    t = time.time()
    summ = run_fit(cfg, progress=False)
    return {"summary": summ, "wall_s": time.time() - t, "arts": Artifacts.load(out)}


def headline(a, ck: Checkpoint, res: dict, ev: dict) -> None:
    N, p, d, L = len(ck.moe_layers) * ck.num_experts, ck.p, ck.hidden_size, len(ck.moe_layers)
    from transformers import AutoTokenizer

    text = (ck.dir / "eval.txt").read_text()
    cut = text.rfind("\n", 0, len(text) // 2) + 1 or len(text) // 2
    work = Path(tempfile.mkdtemp(prefix="bench_fit2_"))
    calib = work / "calib.txt"
    calib.write_text(text[:cut])
    ids = tokenize(AutoTokenizer.from_pretrained(str(ck.dir)), text[cut:], None)
    scorer = Scorer(ck, ids, a.context)
    W = {f: ck.load_family(f, torch.float32) for f in FAMS}
    base = scorer.score()
    ev.update({"fixture": ck.dir.name, "scored_text": "second half of eval.txt", "tokens": base["tokens"],
               "context": a.context, "original_perplexity": base["perplexity"], "steps": a.steps, "batch": a.batch})
    runs = ev.setdefault("runs", {})
    head = res.setdefault("headline", {})
    tok_tag = "" if a.calib_tokens == 4096 else f"_t{a.calib_tokens}"  # routing runs: counts from other lengths
    counts = None  # routed-token counts of the calibration half (part routing, MoBE-style rows)

    def record(key: str, row: dict, Wh: dict | None) -> None:
        if Wh is not None:
            row["perplexity"] = scorer.score(Wh)["perplexity"]
            row["delta_ppl"] = row["perplexity"] - base["perplexity"]
            row.update({f"err_{f}": rel_err(W[f], Wh[f]) for f in FAMS})
        row["loadavg"] = os.getloadavg()
        runs[key] = row
        print(key, json.dumps({k: v for k, v in row.items() if k != "loadavg"}), flush=True)
        save(EVAL_JSON, ev)

    for b in a.budgets:
        tag = f"{round(100 * b)}%"
        hb = head.setdefault(tag, {"budget": b, "globe": {}})
        for share in a.scopes:
            key = f"globe[{share}]@{tag}"
            if key in runs:
                continue
            M = best_M(res, b, share, N, p, d, L)
            r = globe_run(a, ck, share, M, b, work / f"g_{share.replace(':', '')}_{tag[:-1]}")
            s = r["summary"]
            fams = s["families"]
            Wh = {f: r["arts"].families[f].reconstruct() for f in FAMS}
            hb["globe"][share] = {"M": M, "m": fams["up"]["m"], "banks": fams["up"]["banks"], "r": fams["up"]["r"],
                                  "target_support": bank_cfg(share, M, L, b)[1]["target_support"],
                                  **{f: {k: fams[f][k] for k in ("rel_fro_error", "stored_params", "stored_fraction",
                                                                 "median_support", "p95_support", "svd_floor_rank_r",
                                                                 "fit_time_s", "best_step")} for f in FAMS},
                                  "svd": s["baselines"]["svd"], "fit_time_s": sum(fams[f]["fit_time_s"] for f in FAMS)}
            record(key, {"method": "globe", "share": share, "budget": b, "M": M, "r": fams["up"]["r"],
                         "stored_params": sum(fams[f]["stored_params"] for f in FAMS),
                         "fit_time_s": hb["globe"][share]["fit_time_s"]}, Wh)
            save(FIT_JSON, res)
        best = min(hb["globe"], key=lambda sh: sum(hb["globe"][sh][f]["rel_fro_error"] for f in FAMS))
        hb["best_share"] = best
        stored = {f: hb["globe"][best][f]["stored_params"] for f in FAMS}
        if f"svd@{tag}" not in runs and "svd" in a.parts:  # SVD at the best GloBE's stored budget
            t = time.time()
            k = {f: svd_rank(stored[f], N, p, d) for f in FAMS}
            Wh = {f: svd_reconstruct(W[f], k[f]) for f in FAMS}
            hb["svd"] = {f: {"rank": k[f], "rel_fro_error": rel_err(W[f], Wh[f]),
                             "stored_params": N * k[f] * (p + d)} for f in FAMS}
            hb["svd"]["time_s"] = time.time() - t
            record(f"svd@{tag}", {"method": "svd", "budget": b, "rank": k["up"],
                                  "stored_params": sum(hb["svd"][f]["stored_params"] for f in FAMS),
                                  "fit_time_s": hb["svd"]["time_s"]}, Wh)
        if f"mobe@{tag}" not in runs and "mobe" in a.parts:  # MoBE-style at the same stored count, best m_l by error
            cand = {}
            for m_l in a.mobe_m:
                t = time.time()
                out = {}
                for f in FAMS:
                    r_m = min(mobe_rank(stored[f], N, L, p, d, m_l), min(p, d))
                    out[f] = mobe_fit(W[f], L, m_l, r_m, activation="silu", steps=a.steps, lr=0.03, seed=0,
                                      return_weights=True)
                cand[m_l] = (out, time.time() - t)
                print(f"mobe m_l={m_l} @{tag}:", {f: round(out[f]["rel_fro_error"], 4) for f in FAMS}, flush=True)
            m_best = min(cand, key=lambda m_l: sum(cand[m_l][0][f]["rel_fro_error"] for f in FAMS))
            out, secs = cand[m_best]
            hb["mobe"] = {"m_per_layer": m_best, "time_s": secs,
                          "grid": {str(m_l): {f: {k: v for k, v in c[0][f].items() if k != "W_hat"} for f in FAMS}
                                   for m_l, c in cand.items()},
                          **{f: {k: v for k, v in out[f].items() if k != "W_hat"} for f in FAMS}}
            record(f"mobe@{tag}", {"method": "mobe", "budget": b, "m_per_layer": m_best, "r": out["up"]["r"],
                                   "stored_params": sum(mobe_params(N, L, p, d, m_best, out[f]["r"]) for f in FAMS),
                                   "fit_time_s": secs}, {f: out[f]["W_hat"] for f in FAMS})
            save(FIT_JSON, res)
        for rw in map(bool, a.act_row_weights if "activation" in a.parts else []):  # activation objective, best scope
            key = f"globe_activation{'_rows' if rw else ''}[{best}]@{tag}"
            if key in runs:
                continue
            M = hb["globe"][best]["M"]
            r = globe_run(a, ck, best, M, b, work / f"act{int(rw)}_{tag[:-1]}", "activation", calib, rw, False)
            fams = r["summary"]["families"]
            record(key, {"method": "globe_activation" + ("_rows" if rw else ""), "share": best, "budget": b, "M": M,
                         "stored_params": sum(fams[f]["stored_params"] for f in FAMS),
                         "fit_time_s": sum(fams[f]["fit_time_s"] for f in FAMS)},
                   {f: r["arts"].families[f].reconstruct() for f in FAMS})
        for pw in a.weight_powers if "routing" in a.parts else []:  # routing weights, best scope
            key = f"globe_routing_p{pw:g}{tok_tag}[{best}]@{tag}"
            if key in runs:
                continue
            M = hb["globe"][best]["M"]
            r = globe_run(a, ck, best, M, b, work / f"rw{pw:g}_{tag[:-1]}", calib=calib, baselines=False, power=pw)
            s = r["summary"]
            fams = s["families"]
            record(key, {"method": "globe_routing", "power": pw, "share": best, "budget": b, "M": M,
                         "calib_tokens": s["expert_weights"]["calib_tokens"], "expert_weights": s["expert_weights"],
                         "stored_params": sum(fams[f]["stored_params"] for f in FAMS),
                         "fit_time_s": sum(fams[f]["fit_time_s"] for f in FAMS)},
                   {f: r["arts"].families[f].reconstruct() for f in FAMS})
        if "routing" in a.parts and "mobe" in hb:  # the MoBE-style bank with the same routing weights
            for pw in a.weight_powers:
                key = f"mobe_routing_p{pw:g}{tok_tag}@{tag}"
                if key in runs:
                    continue
                if counts is None:  # one calibration pass for every power and budget of this call
                    counts = routing_counts(ck, calib, a.calib_tokens, progress=False)
                wts = routing_weights(counts, pw)
                m_l, t, out = hb["mobe"]["m_per_layer"], time.time(), {}
                for f in FAMS:
                    out[f] = mobe_fit(W[f], L, m_l, hb["mobe"][f]["r"], activation="silu", steps=a.steps, lr=0.03,
                                      seed=0, return_weights=True, weights=wts)
                record(key, {"method": "mobe_routing", "power": pw, "budget": b, "m_per_layer": m_l,
                             "r": out["up"]["r"], "calib_tokens": a.calib_tokens,
                             "stored_params": sum(mobe_params(N, L, p, d, m_l, out[f]["r"]) for f in FAMS),
                             "fit_time_s": time.time() - t}, {f: out[f]["W_hat"] for f in FAMS})
        if all(k in hb for k in ("svd", "mobe")) and f"svd@{tag}" in runs:
            summarize(res, ev, tag)
        save(FIT_JSON, res)
        save(EVAL_JSON, ev)


def summarize(res: dict, ev: dict, tag: str) -> None:
    """Ratios and targets of one budget (GloBE's best scope vs both baselines)."""
    hb = res["headline"][tag]
    best = hb["best_share"]
    g = hb["globe"][best]
    out = {}
    for f in FAMS:
        e = g[f]["rel_fro_error"]
        sv, mb = hb["svd"][f]["rel_fro_error"], hb["mobe"][f]["rel_fro_error"]
        out[f] = {"globe": e, "svd": sv, "mobe": mb, "ratio_vs_svd": e / sv, "ratio_vs_mobe": e / mb}
        out[f]["le_0.8x_svd"] = out[f]["ratio_vs_svd"] <= 0.8
        out[f]["le_0.9x_mobe"] = out[f]["ratio_vs_mobe"] <= 0.9
    runs = ev["runs"]
    d_svd = runs[f"svd@{tag}"]["delta_ppl"]
    dg = runs[f"globe[{best}]@{tag}"]["delta_ppl"]
    out["delta_ppl_ratio_vs_svd"] = dg / d_svd if d_svd > 0 else None
    out["ppl_target_half_of_svd_met"] = d_svd > 0 and dg <= 0.5 * d_svd
    routed = {k: r for k, r in runs.items() if r.get("method") == "globe_routing" and r.get("budget") == hb["budget"]
              and "delta_ppl" in r}
    if routed and d_svd > 0:  # the same fit with routing weights (train.expert_weights=routing), each power
        out["routing"] = {}
        for k, r in routed.items():
            row = {"power": r["power"], "delta_ppl_ratio_vs_svd": r["delta_ppl"] / d_svd,
                   "ppl_target_half_of_svd_met": r["delta_ppl"] <= 0.5 * d_svd, "err_up": r["err_up"],
                   "err_gate": r["err_gate"]}
            tt = "" if r.get("calib_tokens", 4096) == 4096 else f"_t{r['calib_tokens']}"
            mb = runs.get(f"mobe_routing_p{r['power']:g}{tt}@{tag}")  # MoBE-style with the same weights
            if mb and "delta_ppl" in mb:
                row.update({"mobe_delta_ppl": mb["delta_ppl"], "ratio_vs_mobe_routing": {
                    f: r[f"err_{f}"] / mb[f"err_{f}"] for f in FAMS}})
            out["routing"][k] = row
    hb["targets"] = out


def recipe_vs_full(res: dict) -> list[dict]:
    """Each recipe row against the full-batch grid's error at the same (budget, scope, M)."""
    full = {(r["budget"], r["share"], r["M"]): r for r in res["grid"]["rows"] if "rel_fro_error" in r}
    out = []
    for r in res.get("recipe", {}).get("rows", []):
        f = full.get((r["budget"], r["share"], r["M"]))
        if f is None or "rel_fro_error" not in r:
            continue
        ratio = r["rel_fro_error"] / f["rel_fro_error"]
        out.append({"budget": r["budget"], "share": r["share"], "M": r["M"],
                    "codes_optimizer": r.get("codes_optimizer", "adam"), "code_pass_every": r.get("code_pass_every", 0),
                    "recipe_error": r["rel_fro_error"],
                    "full_batch_error": f["rel_fro_error"], "ratio": ratio, "within_2pct": ratio <= 1.02,
                    "recipe_fit_time_s": r["fit_time_s"], "full_batch_fit_time_s": f["fit_time_s"]})
    return out


def report(res: dict, ev: dict) -> str:
    """Markdown tables of the grid, the recipe check and the headline (what README.md and docs/fit.md quote)."""
    out = [f"## Grid (up family, batch {res['grid']['batch_size']}, {res['grid']['steps']} steps): relative "
           "Frobenius error", "",
           "| budget | scope | M (total atoms) | m per bank | r | target support | stored | error | rank-r floor |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["grid"]["rows"], key=lambda r: (-r["budget"], SCOPES.index(r["share"]), r["M"])):
        if "rel_fro_error" not in r:
            out.append(f"| {r['budget']:.0%} | {r['share']} | {r['M']} | - | - | - | infeasible | - | - |")
            continue
        out.append(f"| {r['budget']:.0%} | {r['share']} | {r['M']} | {r['m']} | {r['r']} | {r['target_support']} | "
                   f"{r['stored_fraction']:.1%} | {r['rel_fro_error']:.4f} | {r['svd_floor_rank_r']:.3f} |")
    if res.get("recipe"):
        rc = res["recipe"]
        out += ["", f"## Recipe check (up family, batch {rc['batch_size']} of {res['N']}, {rc['steps']} steps) vs the "
                f"full-batch grid ({res['grid']['batch_size']} experts, {res['grid']['steps']} steps)", "",
                f"| budget | scope | M | codes | error at batch {rc['batch_size']} | full-batch error | ratio | "
                "within 2% | fit time (s) recipe / full |", "|---|---|---|---|---|---|---|---|---|"]
        for x in res.get("recipe_vs_full", []):
            codes = x["codes_optimizer"] + (f", pass every {x['code_pass_every']}" if x["code_pass_every"] else "")
            out.append(f"| {x['budget']:.0%} | {x['share']} | {x['M']} | {codes} | {x['recipe_error']:.4f} | "
                       f"{x['full_batch_error']:.4f} | {x['ratio']:.3f} | {'yes' if x['within_2pct'] else 'no'} | "
                       f"{x['recipe_fit_time_s']:.0f} / {x['full_batch_fit_time_s']:.0f} |")
    if res.get("recipe_steps"):
        out += ["", f"## Steps at the recipe's batch (up family) vs the full-batch grid ({res['grid']['batch_size']} "
                f"experts, {res['grid']['steps']} steps)", "",
                "| budget | scope | M | r | batch | lr | steps | epochs | error | full-batch error | ratio | within 2% "
                "| fit time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in sorted(res["recipe_steps"], key=lambda x: (-x["budget"], x["share"], x["M"], x["lr"], x["steps"])):
            ok = "-" if x["ratio"] is None else ("yes" if x["ratio"] <= 1.02 else "no")
            out.append(f"| {x['budget']:.0%} | {x['share']} | {x['M']} | {x['r']} | {x['batch_size']} | {x['lr']:g} | "
                       f"{x['steps']} | {x['epochs']:.1f} | {x['rel_fro_error']:.4f} | "
                       f"{x['full_batch_error'] or float('nan'):.4f} | {x['ratio'] or float('nan'):.3f} | {ok} | "
                       f"{x['fit_time_s']:.0f} |")
    for tag, hb in res.get("headline", {}).items():
        if "targets" not in hb:
            continue
        out += ["", f"## Headline at {tag} (both families, {ev.get('steps')} steps, batch {ev.get('batch')}; "
                f"perplexity: {ev.get('scored_text')}, {ev.get('tokens')} tokens, "
                f"original {ev['original_perplexity']:.3f})", "",
                "| method | setting | stored (up+gate) | error up / gate | vs SVD | vs MoBE | perplexity | delta | "
                "delta / SVD's | fit time (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
        runs = ev["runs"]
        d_svd = runs[f"svd@{tag}"]["delta_ppl"]
        keys = [f"globe[{sh}]@{tag}" for sh in SCOPES if f"globe[{sh}]@{tag}" in runs]
        keys += [k for k in runs if k.startswith("globe_activation") and k.endswith(f"@{tag}")]
        keys += [f"svd@{tag}", f"mobe@{tag}"]
        keys += sorted((k for k in runs if "_routing_p" in k and k.endswith(f"@{tag}")),
                       key=lambda k: (runs[k]["method"], runs[k]["power"], runs[k].get("calib_tokens", 4096)))
        for k in keys:
            x = runs[k]
            eu, eg = x["err_up"], x["err_gate"]
            sv = [hb["svd"][f]["rel_fro_error"] for f in FAMS]
            mb = [hb["mobe"][f]["rel_fro_error"] for f in FAMS]
            if x["method"] == "svd":
                setting = f"rank {x['rank']}"
            elif x["method"] in ("mobe", "mobe_routing"):
                setting = f"{x['m_per_layer']} atoms/layer, r {x['r']}"
            else:
                setting = f"{x['share']}, M {x['M']}" + (f", r {x['r']}" if "r" in x else "")
            if "power" in x:  # routing weights: their power and the calibration tokens they were counted on
                setting += f", power {x['power']:g}, {x['calib_tokens']} tokens"
            out.append(f"| {x['method']} | {setting} | {x['stored_params']:,} | {eu:.4f} / {eg:.4f} | "
                       f"{eu / sv[0]:.3f} / {eg / sv[1]:.3f} | {eu / mb[0]:.3f} / {eg / mb[1]:.3f} | "
                       f"{x['perplexity']:.3f} | {x['delta_ppl']:.3f} | "
                       f"{x['delta_ppl'] / d_svd if d_svd > 0 else float('nan'):.2f} | {x['fit_time_s']:.0f} |")
    if res.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=("grid", "recipe", "steps", "headline", "report"), required=True)
    ap.add_argument("--steps-list", type=int, nargs="+", default=[3000, 9000, 18000, 27000],
                    help="stage steps: the schedules tried at --batch")
    ap.add_argument("--lr", type=float, default=LR, help="stage steps: train.lr")
    ap.add_argument("--model", default=str(FIXTURE2_DIR))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--scopes", nargs="+", default=list(SCOPES))
    ap.add_argument("--totals", type=int, nargs="+", default=[48, 96, 192, 384, 768], help="total atoms M per family")
    ap.add_argument("--mobe-m", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="MoBE atoms per layer tried")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32, help="experts per step (the prototype recipe: <= 32 of 1440)")
    ap.add_argument("--codes-optimizer", default="adam", choices=("adam", "row_adam"))
    ap.add_argument("--code-pass-every", type=int, default=0, help="train.code_pass_every (0: off)")
    ap.add_argument("--code-pass-steps", type=int, default=1)
    ap.add_argument("--act-row-weights", type=int, nargs="*", default=[0, 1], choices=(0, 1),
                    help="activation-objective runs: without (0) / with (1) train.calib_row_weights")
    ap.add_argument("--parts", nargs="+", default=["svd", "mobe", "activation", "routing"],
                    choices=("svd", "mobe", "activation", "routing"),
                    help="headline: what runs besides the GloBE scopes")
    ap.add_argument("--weight-powers", type=float, nargs="+", default=[0.5],
                    help="part routing: train.expert_weight_power of each routing-weighted run (default 0.5); "
                         "the MoBE-style bank runs with the same weights where the results already hold its "
                         "uniform row (part mobe)")
    ap.add_argument("--calib-tokens", type=int, default=4096,
                    help="part routing: train.calib_tokens (default 4096)")
    ap.add_argument("--context", type=int, default=256, help="perplexity window (tokens)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=str(RES), help="directory of the two JSON files")
    a = ap.parse_args()
    if not all(0 <= pw <= 2 for pw in a.weight_powers):  # the range train.expert_weight_power accepts
        ap.error(f"--weight-powers: each must be in [0, 2], got {a.weight_powers}")
    if a.calib_tokens < 2:
        ap.error(f"--calib-tokens: must be >= 2, got {a.calib_tokens}")
    global FIT_JSON, EVAL_JSON
    FIT_JSON, EVAL_JSON = Path(a.results) / FIT_JSON.name, Path(a.results) / EVAL_JSON.name
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ck = Checkpoint(a.model)
    res, ev = load(FIT_JSON), load(EVAL_JSON)
    if a.stage in ("report", "headline") and not res.get("grid", {}).get("rows"):
        ap.error(f"--stage {a.stage}: {FIT_JSON} holds no grid; run --stage grid first (or point --results at a "
                 "directory that holds one: the committed benchmarks/results)")
    res.update({"model": ck.dir.name, "N": len(ck.moe_layers) * ck.num_experts, "layers": len(ck.moe_layers),
                "experts_per_layer": ck.num_experts, "p": ck.p, "d": ck.hidden_size, "threads": a.threads})
    res.setdefault("loadavg_start", {})[a.stage] = os.getloadavg()
    if a.stage == "report":
        res["recipe_vs_full"] = recipe_vs_full(res)
        save(FIT_JSON, res)
        md = report(res, ev)
        atomic_write(FIT_JSON.with_suffix(".md"), lambda q: Path(q).write_text(md))
        print(md)
        return
    if a.stage in ("grid", "recipe"):
        grid(a, ck, res, a.stage)
    elif a.stage == "steps":
        steps_sweep(a, ck, res)
    else:
        headline(a, ck, res, ev)
    res.setdefault("loadavg_end", {})[a.stage] = os.getloadavg()
    save(FIT_JSON, res)
    print(json.dumps({t: h.get("targets") for t, h in res.get("headline", {}).items()}, indent=1))


if __name__ == "__main__":
    main()

"""Emulated mixed fidelity on fixture 2: the busiest routed experts kept exact, the rest fitted at what is left.

Why: on fixture 2 the router is very uneven (README "Routing weights"), so a few experts serve a large
share of the tokens. This measures, before any format supports it, what keeping the busiest fraction
q of experts exact (their original Up/Gate) would buy at a matched total budget, for GloBE and for
per-expert SVD alike. It is an EMULATION, pessimistic for GloBE: the fit still covers all N experts (the
kept ones with weight 1e-6 in the objective, so the bank ignores them) at budget b - q, and their
adapters are counted as stored although a real format would drop them; afterwards each kept expert's
reconstruction is replaced by its original weights. The stored fraction reported is GloBE's stored
parameters / (N p d) + q. SVD: rank k = the nearest rank to (b - q) N p d / (N (p + d)) for every
expert, kept ones exact (stored k (p + d) N + q N p d).

Busiest (--select) over --calib-tokens of the first half of eval.txt, the model's own routing: `mass`
(default) = the sum over routed tokens of the squared routing weight, sum_t g_ti^2 (an expert's output
enters the layer's output scaled by g, so its squared error by g^2), recomputed from the router
(softmax over the experts, top-k, no renormalisation: Qwen2-MoE with norm_topk_prob false; checked
against the model's own choice on every token); `counts` = routed slots (`routing_counts`, what
`train.expert_weights=routing` counts). The remaining experts are weighted by the same statistic to the
power --power, as `train.expert_weights=routing` does with counts; perplexity is scored on the second
half (as bench_fit2.py). Same scope, atoms and schedule as
bench_fit2's headline (--scope, --atoms, --steps, full batch, lr 0.03, bank.r_multiple=1, seed 0).

    python benchmarks/bench_keep_dense.py --budget 0.3 --scope layer --fractions 0 0.05 0.1 0.15
    python benchmarks/bench_keep_dense.py --budget 0.5 --scope group:2 --fractions 0 0.05 0.1
    python benchmarks/bench_keep_dense.py --real --budget 0.3 --scope layer --fractions 0.05 0.1
    python benchmarks/bench_keep_dense.py --real --budget 0.5 --scope group:2 --fractions 0.05 0.1
--real runs the library's feature (`bank.keep_fraction`: kept experts hidden from the fit, no weight
floor, the budget's rank for the rest, routing weights by counts as `train.expert_weights=routing`) and
scores it the same way; its rows are keyed `..._real`.
Writes benchmarks/results/keep_dense_fixture2.json (rows keyed by budget, fraction and method; reruns skip
rows already there). One torch thread.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from usage import Parser, check_out

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_fit2 as B  # noqa: E402

import globe.fit.run as fit_run  # noqa: E402
from globe.fit.budget import svd_rank  # noqa: E402
from globe.fit.calib import Calibration, routing_counts, routing_weights  # noqa: E402
from globe.fixtures import FIXTURE2_DIR  # noqa: E402
from globe.io.checkpoint import Checkpoint  # noqa: E402

OUT = B.RES / "keep_dense_fixture2.json"


def gate_mass(ck: Checkpoint, text: Path, n_tokens: int) -> torch.Tensor:
    """sum_t g_ti^2 (N,) float64 over the routed tokens of every expert, layer-major (see the docstring)."""
    from safetensors import safe_open

    from globe.fit.calib import _calib_pass

    E = ck.num_experts
    mass = torch.zeros(len(ck.moe_layers) * E, dtype=torch.float64)
    f = safe_open(str(ck.dir / "model.safetensors"), "pt")

    def make(L, _experts):
        li = ck.moe_layers.index(L)
        router = f.get_tensor(f"model.layers.{L}.mlp.gate.weight").float()  # (E, d)

        def hook(x, top, _w=None):
            g, idx = torch.softmax(x.float() @ router.T, -1).topk(ck.top_k, -1)
            if not torch.equal(idx.sort(-1).values, top.long().sort(-1).values):
                raise SystemExit(f"error: layer {L}: recomputed routing differs from the model's")
            mass[li * E:(li + 1) * E] += torch.zeros(E, dtype=torch.float64).index_add_(
                0, idx.reshape(-1), (g ** 2).reshape(-1).double())
        return hook
    _calib_pass(ck, text, n_tokens, 256, make, False)
    return mass


def main() -> None:
    ap = Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=0.3, help="total stored fraction of routed Up+Gate")
    ap.add_argument("--scope", default="layer", choices=B.SCOPES)
    ap.add_argument("--atoms", type=int, default=384, help="total atoms M per family (bench_fit2's headline: 384)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.05, 0.1], help="experts kept exact")
    ap.add_argument("--power", type=float, default=0.5, help="routing-weight power of the fitted experts")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--select", default="mass", choices=("mass", "counts"), help="what 'busiest' means")
    ap.add_argument("--real", action="store_true",
                    help="the library's bank.keep_fraction (train.expert_weights=routing by counts, --power) instead "
                         "of the emulation")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    if not 0 < a.budget <= 1:
        ap.error(f"--budget: must be in (0, 1], got {a.budget}")
    if not all(0 <= q < a.budget for q in a.fractions):
        ap.error(f"--fractions: each must be in [0, --budget), got {a.fractions}")
    if not 0 <= a.power <= 2:
        ap.error(f"--power: must be in [0, 2], got {a.power}")
    check_out(a.out)
    torch.set_num_threads(1)
    ck = Checkpoint(FIXTURE2_DIR)
    N, p, d = len(ck.moe_layers) * ck.num_experts, ck.p, ck.hidden_size
    text = (ck.dir / "eval.txt").read_text()
    cut = text.rfind("\n", 0, len(text) // 2) + 1
    work = Path(tempfile.mkdtemp(prefix="bench_keep_dense_"))
    calib = work / "calib.txt"
    calib.write_text(text[:cut])
    from transformers import AutoTokenizer

    scorer = B.Scorer(ck, B.tokenize(AutoTokenizer.from_pretrained(str(ck.dir)), text[cut:], None), 256)
    base = scorer.score()["perplexity"]
    W = {f: ck.load_family(f, torch.float32) for f in B.FAMS}
    counts = routing_counts(ck, calib, a.calib_tokens, progress=False) if a.select == "counts" else \
        gate_mass(ck, calib, a.calib_tokens)
    order = torch.argsort(counts, descending=True, stable=True)
    res = B.load(Path(a.out))
    res.update({"fixture": ck.dir.name, "original_perplexity": base, "steps": a.steps, "calib_tokens": a.calib_tokens,
                "scored_text": "second half of eval.txt", "emulation": "kept experts fitted with weight 1e-6 and "
                "their adapters counted as stored; then replaced by their original weights"})
    rows = res.setdefault("rows", {})
    args = types.SimpleNamespace(steps=a.steps, batch=N, codes_optimizer="adam", code_pass_every=0,
                                 code_pass_steps=1, calib_tokens=a.calib_tokens)
    for q in a.fractions:
        K = int(round(q * N))
        kept = order[:K]
        share = counts[kept].sum() / counts.sum() if K else torch.tensor(0.0)
        b = a.budget - K / N
        tag = f"{round(100 * a.budget)}%_q{q:g}_{a.select}"
        if f"svd@{tag}" not in rows:
            k = svd_rank(b * N * p * d, N, p, d)
            Wh = {f: B.svd_reconstruct(W[f], k) for f in B.FAMS}
            for f in B.FAMS:
                Wh[f][kept] = W[f][kept]
            rows[f"svd@{tag}"] = {"method": "svd", "budget": a.budget, "kept": K, "select": a.select,
                                  "routed_share_kept": float(share),
                                  "rank": k, "stored_fraction": (k * (p + d) * N) / (N * p * d) + K / N,
                                  "delta_ppl": scorer.score(Wh)["perplexity"] - base}
            print(f"svd@{tag}", json.dumps(rows[f"svd@{tag}"]), flush=True)
        key = f"globe[{a.scope}]@{tag}"
        if a.real:
            real(a, ck, W, scorer, base, q, kept, work / f"real_{tag}", calib, args, rows, key + "_real")
            B.save(Path(a.out), res)
            continue
        if key in rows:
            continue
        w = routing_weights(counts * (1 if a.select == "counts" else 1e3), a.power)  # floor at 1 = 1e-3 mass
        w[kept] = 1e-6

        def calibration(cfg, ck, progress=None, w=w):  # the fit's weights: routing, kept experts ~0
            return Calibration(None, None, w, {"kind": "routing", "power": a.power, "calib_tokens": a.calib_tokens},
                               [], None)
        fit_run.calibration = calibration
        t = time.time()
        r = B.globe_run(args, ck, a.scope, a.atoms, b, work / tag, calib=calib, baselines=False, power=a.power)
        fams = r["summary"]["families"]
        Wh = {f: r["arts"].families[f].reconstruct() for f in B.FAMS}
        for f in B.FAMS:
            Wh[f][kept] = W[f][kept]
        stored = sum(fams[f]["stored_params"] for f in B.FAMS) / (2 * N * p * d) + K / N
        rows[key] = {"method": "globe", "share": a.scope, "atoms": a.atoms, "budget": a.budget, "kept": K,
                     "select": a.select, "routed_share_kept": float(share), "fit_budget": b, "r": fams["up"]["r"],
                     "stored_fraction": stored, "delta_ppl": scorer.score(Wh)["perplexity"] - base,
                     "err": {f: B.rel_err(W[f], Wh[f]) for f in B.FAMS}, "fit_time_s": time.time() - t,
                     "loadavg": os.getloadavg()}
        print(key, json.dumps(rows[key]), flush=True)
        B.save(Path(a.out), res)
    B.save(Path(a.out), res)


def real(a, ck, W, scorer, base, q, emulated, out, calib, args, rows, key) -> None:
    """One row of the library feature: run_fit with bank.keep_fraction=q at the total budget --budget (the
    fit derives r for what is left), routing weights by counts; scored with the kept experts' originals."""
    if key in rows:
        return
    t = time.time()
    r = B.globe_run(args, ck, a.scope, a.atoms, a.budget, out, calib=calib, baselines=True, power=a.power, keep=q)
    summ, arts = r["summary"], r["arts"]
    kept = arts.kept
    Wh = {f: arts.families[f].reconstruct() for f in B.FAMS}
    for f in B.FAMS:
        Wh[f][kept] = W[f][kept]
    fams = summ["families"]
    rows[key] = {"method": "globe", "feature": "bank.keep_fraction", "share": a.scope, "atoms": a.atoms,
                 "budget": a.budget, "keep_fraction": q, "kept": len(kept), "select": "mass",
                 "same_experts_as_emulation": sorted(kept) == sorted(emulated.tolist()),
                 "keep": summ.get("keep"), "r": fams["up"]["r"], "stored_fraction": summ["budget"]["achieved"],
                 "delta_ppl": scorer.score(Wh)["perplexity"] - base,
                 "err": {f: B.rel_err(W[f], Wh[f]) for f in B.FAMS},
                 "summary_err": {f: fams[f]["rel_fro_error"] for f in B.FAMS},
                 "err_fitted": {f: fams[f].get("rel_fro_error_fitted") for f in B.FAMS},
                 "svd_err": {f: summ["baselines"]["svd"][f]["rel_fro_error"] for f in B.FAMS},
                 "fit_time_s": time.time() - t, "loadavg": os.getloadavg()}
    print(key, json.dumps(rows[key]), flush=True)


if __name__ == "__main__":
    main()

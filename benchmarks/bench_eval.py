"""Perplexity of the fixture after compression: original vs GloBE (weight-only and activation-aware)
vs per-expert SVD vs a MoBE-style bank, at matched stored budgets (~50% and ~30% of routed up+gate).

    python benchmarks/bench_eval.py [--steps 3000] [--budgets 0.5 0.3] [--m 16] [--support 8]
                                    [--max-tokens N] [--model DIR] [--out benchmarks/results/eval_fixture.json]

Every method is scored the same way: its reconstructed Up/Gate weights are written into one fp32
copy of the fixture (down, router, shared experts, attention untouched) and the sliding-window
perplexity of the fixture's eval.txt is computed with globe.eval.perplexity. GloBE is fitted by
`globe.fit.run.run_fit` at the rank `rank_for_budget` gives for the budget; SVD uses the rank the fit
summary reports for the matched budget; the MoBE-style bank is refitted with
globe/fit/baselines.py:mobe_fit (same call and seed as the fit, return_weights=True), and its error
is checked against the summary's. The activation-aware fit calibrates on the first half of eval.txt unless the
fixture ships a separate calibration text, in which case all of eval.txt is scored;
with the split, every method is scored on the second half only.
Settings (m=16, target support 8, 3000 steps, batch 64, lr 0.03) follow benchmarks/bench_fit.py's headline.
Target: GloBE's perplexity increase <= half of the SVD baseline's at the same budget.
Writes the JSON and renders `globe report` of the 50% weight-only fit into <out stem>_report/.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from usage import Parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from globe.artifacts import Artifacts, atomic_write  # noqa: E402
from globe.config import GlobeConfig  # noqa: E402
from globe.eval.perplexity import perplexity, tokenize  # noqa: E402
from globe.eval.report import render_report  # noqa: E402
from globe.fit.baselines import mobe_fit  # noqa: E402
from globe.fit.budget import mobe_rank, rank_for_budget  # noqa: E402
from globe.io.checkpoint import Checkpoint  # noqa: E402
from globe.testing.models import fixture_path  # noqa: E402

FAMS = ("up", "gate")


def rel_err(W: torch.Tensor, Wh: torch.Tensor) -> float:
    return float(((W - Wh) ** 2).sum() / (W**2).sum()) ** 0.5


def svd_reconstruct(W: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return ((U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]).float()


class Scorer:
    """One fp32 copy of the fixture; score(W_hat per family) swaps the routed Up/Gate weights in and out."""

    def __init__(self, ck: Checkpoint, ids: torch.Tensor, context: int):
        from transformers import AutoModelForCausalLM

        self.ck, self.ids, self.context = ck, ids, context
        self.model = AutoModelForCausalLM.from_pretrained(str(ck.dir), dtype=torch.float32).eval()
        self.p = ck.p
        self.orig = {L: self._gu(L).detach().clone() for L in ck.moe_layers}

    def _gu(self, L: int) -> torch.nn.Parameter:
        return getattr(self.model.model.layers[L], self.ck.spec.block).experts.gate_up_proj  # (E, 2p, d)

    @torch.no_grad()
    def score(self, W_hat: dict[str, torch.Tensor] | None = None) -> dict:
        E, p = self.ck.num_experts, self.p
        for li, L in enumerate(self.ck.moe_layers):
            gu = self._gu(L)
            gu.copy_(self.orig[L])
            for f, Wh in (W_hat or {}).items():
                rows = slice(0, p) if f == "gate" else slice(p, 2 * p)
                gu[:, rows] = Wh[li * E:(li + 1) * E].to(gu.dtype)
        res = perplexity(self.model, self.ids, self.context)
        for L in self.ck.moe_layers:
            self._gu(L).copy_(self.orig[L])
        return res


def fit(fixture: Path, out: Path, r: int, args, objective: str, calib: Path | None, baselines: bool) -> dict:
    from globe.fit.run import run_fit

    cfg = GlobeConfig.from_dict({
        "model": {"path": str(fixture)},
        "bank": {"m_up": args.m, "m_gate": args.m, "r": r, "seed": 0},
        "sparsity": {"target_support": args.support},
        "train": {"steps": args.steps, "batch_size": 64, "lr": 0.03, "eval_every": 100, "log_every": 50,
                  "baseline_mobe": baselines,  # both baselines, explicitly (MoBE is opt-in in `globe fit`)
                  "device": "cpu",
                  "objective": objective, "baselines": baselines, "calib_text": str(calib) if calib else None,
                  "checkpoint_every": 10**6, "seed": 0},
        "output_dir": str(out),
    })
    summary = run_fit(cfg, progress=False)
    return {"summary": summary, "artifacts": Artifacts.load(out), "cfg": cfg}


def main() -> None:
    ap = Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--m", type=int, default=16, help="atoms per family bank (< experts per family)")
    ap.add_argument("--support", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="model dir with tokenizer + eval.txt (default: bundled fixture)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_fixture.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    fixture = Path(args.model) if args.model else fixture_path()
    ck = Checkpoint(fixture)
    N, p, d = len(ck.moe_layers) * ck.num_experts, ck.p, ck.hidden_size
    from transformers import AutoTokenizer

    text = (fixture / "eval.txt").read_text()
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    calib = next((fixture / n for n in ("calib.txt", "train.txt") if (fixture / n).is_file()), None)
    if calib is None:  # no separate calibration text: calibrate on the first half, score the second half
        cut = len(text) // 2
        cut = text.rfind("\n", 0, cut) + 1 or cut
        calib = work / "calib.txt"
        calib.write_text(text[:cut])
        text = text[cut:]
        scored = "second half of eval.txt"
    else:
        scored = "eval.txt"
    ids = tokenize(AutoTokenizer.from_pretrained(str(fixture)), text, args.max_tokens)
    scorer = Scorer(ck, ids, args.context)
    W = {f: ck.load_family(f, torch.float32) for f in FAMS}
    base = scorer.score()
    print(f"original: ppl {base['perplexity']:.4f} over {base['tokens']} tokens", flush=True)
    runs = [{"label": "original", "method": "original", "budget": 1.0, "perplexity": base["perplexity"],
             "stored_params": 2 * N * p * d, "err_up": 0.0, "err_gate": 0.0, "delta_ppl": 0.0}]
    ratios, keep = {}, None
    for frac in args.budgets:
        r = rank_for_budget(frac, N, p, d, args.m, args.support, r_max=min(p, d))
        tag = f"{round(100 * frac)}%"
        for objective in ("weight", "activation"):
            out = work / f"fit_{objective}_{tag[:-1]}"
            res = fit(fixture, out, r, args, objective, calib, baselines=objective == "weight")
            arts, summ = res["artifacts"], res["summary"]
            Wh = {f: arts.families[f].reconstruct() for f in FAMS}
            sc = scorer.score(Wh)
            label = "globe" if objective == "weight" else "globe_activation"
            runs.append({"label": f"{label}@{tag}", "method": label, "budget": frac, "r": r,
                         "perplexity": sc["perplexity"],
                         "stored_params": sum(summ["families"][f]["stored_params"] for f in FAMS),
                         **{f"err_{f}": rel_err(W[f], Wh[f]) for f in FAMS},
                         "median_support": {f: summ["families"][f]["median_support"] for f in FAMS},
                         "fit_time_s": summ["fit_time_s"]})
            print(f"{runs[-1]['label']}: r={r} ppl {sc['perplexity']:.4f} err up {runs[-1]['err_up']:.4f} "
                  f"gate {runs[-1]['err_gate']:.4f}", flush=True)
            if objective == "weight":
                wsum, keep = summ, (out, tag) if keep is None else keep
        # baselines at the weight-only fit's stored budget, as the fit summary matched them
        bl = wsum["baselines"]
        Wsvd = {f: svd_reconstruct(W[f], bl["svd"][f]["rank"]) for f in FAMS}
        tr = res["cfg"].train
        Wmobe = {}
        for f in FAMS:
            m_l = bl["mobe"][f]["m_per_layer"]
            r_m = bl["mobe"][f]["r"]
            assert r_m == min(mobe_rank(wsum["families"][f]["stored_params"], N, len(ck.moe_layers), p, d, m_l), p)
            Wmobe[f] = mobe_fit(W[f], len(ck.moe_layers), m_l, r_m, activation="silu", steps=bl["mobe"][f]["steps"],
                                lr=tr.lr, seed=0, lam=tr.ridge, return_weights=True)["W_hat"]
        for meth, Wb in (("svd", Wsvd), ("mobe", Wmobe)):
            sc = scorer.score(Wb)
            errs = {f"err_{f}": rel_err(W[f], Wb[f]) for f in FAMS}
            for f in FAMS:  # our reconstruction must be the baseline the fit summary reports
                assert abs(errs[f"err_{f}"] - bl[meth][f]["rel_fro_error"]) < 2e-3, (meth, f, errs, bl[meth][f])
            runs.append({"label": f"{meth}@{tag}", "method": meth, "budget": frac, "perplexity": sc["perplexity"],
                         "stored_params": sum(bl[meth][f]["stored_params"] for f in FAMS), **errs})
            print(f"{meth}@{tag}: ppl {sc['perplexity']:.4f} err up {errs['err_up']:.4f} gate {errs['err_gate']:.4f}",
                  flush=True)
        by = {x["method"]: x for x in runs if x["budget"] == frac}
        for x in by.values():
            x["delta_ppl"] = x["perplexity"] - base["perplexity"]
        d_svd = by["svd"]["delta_ppl"]
        ratios[tag] = {m: by[m]["delta_ppl"] / d_svd if d_svd > 0 else None
                       for m in ("globe", "globe_activation", "mobe")}
    target = {tag: {m: v is not None and v <= 0.5 for m, v in rs.items() if m.startswith("globe")}
              for tag, rs in ratios.items()}
    result = {
        "fixture": fixture.name, "scored_text": scored, "tokens": base["tokens"], "context": args.context,
        "N_per_family": N, "p": p, "d": d, "m": args.m, "target_support": args.support, "steps": args.steps,
        "threads": args.threads, "runs": runs,
        "delta_ppl_ratio_vs_svd": ratios, "target_half_of_svd_met": target,
        "seconds": time.time() - t0,
    }
    out_json = Path(args.out)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_json, lambda q: Path(q).write_text(json.dumps(result, indent=2) + "\n"))
    # report of the first budget's weight-only fit, with every scored run in its comparison table
    run_dir, tag = keep
    evals = [{**x, "label": x["method"] if x["budget"] in (1.0, args.budgets[0]) else x["label"]} for x in runs]
    (run_dir / "eval_fixture.json").write_text(json.dumps({"runs": evals}, indent=2))
    render_report(run_dir, out_json.with_name(out_json.stem + "_report"), checkpoint=str(fixture))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"delta_ppl_ratio_vs_svd": ratios, "target_half_of_svd_met": target}, indent=2))


if __name__ == "__main__":
    main()

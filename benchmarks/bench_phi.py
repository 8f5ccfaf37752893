"""Does the bank's phi matter? `bank.activation` silu (default) vs identity (vs tanh) on both trained fixtures.

Why: phi in tilde_B_i = phi(g * sum_j alpha_ij B_j) is what MoBE uses to make a mixture of few atoms more
expressive, but at runtime it is the most expensive part of composing a block (silu costs more than the
mixing itself at Qwen1.5 sizes; `bench_kernels.py`), which `lru` and `none` pay on every miss. This measures
what phi buys in quality: relative Frobenius error per family and the perplexity of the reconstruction, same
seed, same schedule, only the activation changing.

Points (each fitted on both families with `fit_family`, one torch thread):
  fixture 2 (qwen2moe-upcycled, N = 1440): the headline settings of fit_fixture2.md, full batch, 600 steps:
            50% budget group:2 with 384 atoms (r 20); 30% budget layer with 384 atoms (r 12)
  fixture 1 (qwen2moe-tiny, N = 64): fit_fixture.json's 50% headline: m 16, r 46, support 8, batch 64, 3000 steps
Perplexity: the second half of each fixture's eval.txt, 256-token windows (as fit_fixture2.md).

    python benchmarks/bench_phi.py [--activations silu identity tanh] [--out FILE]
writes benchmarks/results/phi_fit.json (rows are appended and skipped when present, so it resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from usage import Parser, check_out, check_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_eval import Scorer, rel_err  # noqa: E402
from bench_fit2 import bank_cfg, save, train_cfg  # noqa: E402

from globe.config import GlobeConfig  # noqa: E402
from globe.eval.perplexity import tokenize  # noqa: E402
from globe.fit.loop import fit_family  # noqa: E402
from globe.fixtures import FIXTURE2_DIR, FIXTURE_DIR  # noqa: E402
from globe.io.checkpoint import Checkpoint  # noqa: E402
from globe.maps import ACTIVATIONS  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "phi_fit.json"
FAMS = ("up", "gate")
CONTEXT = 256


def points() -> list[dict]:
    """(name, fixture, config builder) of every measured setting; bank/sparsity/train dicts for GlobeConfig."""
    f2 = argparse.Namespace(steps=600, batch=1440, codes_optimizer="adam", code_pass_every=0, code_pass_steps=1)
    out = []
    for b, share in ((0.5, "group:2"), (0.3, "layer")):
        bank, sp = bank_cfg(share, 384, 24, b)
        out.append({"name": f"fixture2 {round(100 * b)}% {share} M384", "fixture": FIXTURE2_DIR, "bank": bank,
                    "sparsity": sp, "train": train_cfg(f2, 1440)})
    out.append({"name": "fixture1 50% m16 r46", "fixture": FIXTURE_DIR,
                "bank": {"m_up": 16, "m_gate": 16, "r": 46, "seed": 0}, "sparsity": {"target_support": 8},
                "train": {"steps": 3000, "batch_size": 64, "lr": 0.03, "eval_every": 300, "device": "cpu",
                          "checkpoint_every": 10 ** 9, "log_every": 10 ** 9, "seed": 0}})
    return out


def scorer(ck: Checkpoint) -> Scorer:
    from transformers import AutoTokenizer

    text = (ck.dir / "eval.txt").read_text()
    cut = text.rfind("\n", 0, len(text) // 2) + 1 or len(text) // 2
    return Scorer(ck, tokenize(AutoTokenizer.from_pretrained(str(ck.dir)), text[cut:], None), CONTEXT)


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--activations", nargs="+", default=["silu", "identity"], choices=sorted(ACTIVATIONS),
                    help="phi values to fit (default silu identity); each point x phi fits both families, about "
                         "1-2 min each on one core")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT), help="JSON file; rows already in it are kept and not re-fitted "
                    "(give a new file to measure again)")
    a = ap.parse_args()
    check_threads(a.threads)
    check_out(a.out)
    out = Path(a.out)
    torch.set_num_threads(a.threads)
    res = json.loads(out.read_text()) if out.is_file() else {}
    res.setdefault("setup", {"threads": a.threads, "context": CONTEXT, "scored_text": "second half of eval.txt",
                             "torch": torch.__version__})
    rows = res.setdefault("rows", [])
    todo = [(pt["name"], act) for pt in points() for act in a.activations
            if not any(r["point"] == pt["name"] and r["activation"] == act for r in rows)]
    if not todo:
        print(f"{out}: every requested row is already there; nothing to fit (give --out NEWFILE to measure again)")
        return
    for pt in points():
        if all(name != pt["name"] for name, _ in todo):
            continue  # nothing left at this point: not even its weights are read
        ck = Checkpoint(pt["fixture"])
        W = {f: ck.load_family(f, torch.float32) for f in FAMS}
        sc = None
        base = res.setdefault("original_perplexity", {})
        for act in a.activations:
            if (pt["name"], act) not in todo:  # measured already (the file resumes)
                continue
            if sc is None:
                sc = scorer(ck)
                base[pt["name"]] = sc.score()["perplexity"]
            cfg = GlobeConfig.from_dict({"bank": {**pt["bank"], "activation": act}, "sparsity": pt["sparsity"],
                                         "train": pt["train"]})
            row = {"point": pt["name"], "activation": act, "fixture": ck.dir.name}
            Wh = {}
            for f in FAMS:
                t = time.time()
                fit = fit_family(W[f], cfg, f, experts_per_layer=ck.num_experts)
                Wh[f] = fit.artifact.reconstruct()
                row[f] = {"rel_fro_error": fit.metrics["rel_fro_error"], "r": fit.metrics["r"],
                          "median_support": fit.metrics["median_support"],
                          "stored_fraction": fit.metrics["stored_params"] / fit.metrics["original_params"],
                          "check_rel_err": rel_err(W[f], Wh[f]), "fit_time_s": time.time() - t}
            row["perplexity"] = sc.score(Wh)["perplexity"]
            row["delta_ppl"] = row["perplexity"] - base[pt["name"]]
            row["loadavg"] = os.getloadavg()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "loadavg"}), flush=True)
            save(out, res)


if __name__ == "__main__":
    main()

"""Ablation sweep on the fixture -> Pareto plot of stored parameters vs perplexity.

Runs `globe fit -m` (the CLI's multirun) over m x target support at r = p/2 (bank.r_frac=0.5) (m_gate follows m_up
through the interpolation `bank.m_gate=${bank.m_up}`), exports each run
(globe format, fp32), evaluates its perplexity on the fixture's eval text with `globe eval`, then
renders `globe report` over the sweep directory, which draws the Pareto plot and table.

Run: python benchmarks/bench_sweep.py [--steps 1500] -> benchmarks/results/sweep_fixture/ (report)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from usage import Parser

from globe.cli.main import main as cli
from globe.eval.report import render_report
from globe.testing.models import fixture_path

OUT = Path(__file__).parent / "results" / "sweep_fixture"


def main() -> None:
    ap = Parser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--m", default="8,16,32")
    ap.add_argument("--support", default="4,8")
    ap.add_argument("--max-tokens", type=int, default=8192)
    a = ap.parse_args()
    fx = fixture_path()
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep"
        rc = cli(["fit", "-m", f"model.path={fx}", f"output_dir={sweep}", f"bank.m_up={a.m}",
                  "bank.m_gate=${bank.m_up}", "bank.r_frac=0.5",  # r = p/2 as committed (default is now bank.budget)
                  f"sparsity.target_support={a.support}", f"train.steps={a.steps}", "train.batch_size=64",
                  "train.eval_every=100", "train.baselines=false", "train.device=cpu"])
        if rc != 0:
            raise SystemExit(rc)
        runs = sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file())
        for run in runs:
            exp = Path(tmp) / f"export_{run.name}"
            if cli(["export", f"model.path={fx}", f"artifacts={run}", f"output_dir={exp}", "export.format=globe",
                    "export.dtype=fp32"]) != 0:
                raise SystemExit(f"export failed for {run.name}")
            if cli(["eval", f"model.path={exp}", f"eval.text={fx / 'eval.txt'}", f"eval.max_tokens={a.max_tokens}",
                    "eval.threads=1", f"output={run / 'eval_globe.json'}"]) != 0:
                raise SystemExit(f"eval failed for {run.name}")
        render_report(sweep, out_dir=OUT)  # report.md + Pareto plot, written atomically
        rows = []
        for run in runs:
            s = json.loads((run / "summary.json").read_text())
            e = json.loads((run / "eval_globe.json").read_text())
            rows.append({"run": run.name, "perplexity": e["perplexity"],
                         "stored_params": sum(f["stored_params"] for f in s["families"].values()),
                         "rel_fro_error": {k: f["rel_fro_error"] for k, f in s["families"].items()},
                         "median_support": {k: f["median_support"] for k, f in s["families"].items()}})
        (OUT / "sweep.json").write_text(json.dumps({"steps": a.steps, "runs": rows}, indent=2) + "\n")
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

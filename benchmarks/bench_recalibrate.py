"""sparsity.recalibrate on the bundled fixture: short and long fits with the temperature controller alone
(recalibrate=0, the default) and with a bisection jump when the median support leaves [tgt/2, tgt*2].

Why: in short fits the logits sharpen faster than the multiplicative controller (+5% per step) can follow:
support falls to 1 in ~10 steps and takes ~60 to come back. Each run is `globe fit` on the fixture
(m = 16, r = p/2, target support 8), baselines off; writes benchmarks/results/recalibrate_fixture.json.

    python benchmarks/bench_recalibrate.py [--threads 2]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from usage import Parser

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "globe" / "fixture" / "qwen2moe-tiny"
RUNS = [(40, 16), (200, 16), (1500, 64)]  # (steps, batch): the README example's scale up to the demo's


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recalibrate_fixture.json"))
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps, batch in RUNS:
            for x in (0, 2):
                out = Path(tmp) / f"s{steps}_x{x}"
                t0 = time.time()
                subprocess.run([sys.executable, "-m", "globe.cli.main", "fit", f"model.path={FIXTURE}",
                                f"output_dir={out}", "bank.m_up=16", "bank.m_gate=16", "bank.r_frac=0.5",
                                "sparsity.target_support=8", f"train.steps={steps}", f"train.batch_size={batch}",
                                "train.eval_every=20", "train.baselines=false", f"sparsity.recalibrate={x}"],
                               check=True, env=env, cwd=ROOT, capture_output=True)
                fams = json.loads((out / "summary.json").read_text())["families"]
                rows.append({"steps": steps, "batch": batch, "recalibrate": x, "wall_s": round(time.time() - t0, 1),
                             **{f: {"rel_fro_error": v["rel_fro_error"], "median_support": v["median_support"]}
                                for f, v in fams.items()}})
                print(json.dumps(rows[-1]), flush=True)
    Path(a.out).write_text(json.dumps({"threads": a.threads, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

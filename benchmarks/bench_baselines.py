"""What the baselines cost next to the fit: `globe fit` with its defaults, SVD only (the default) and with
the opt-in MoBE-style baseline (`train.baseline_mobe=true`), on the bundled fixture.

Both runs fit the same families with the same config; summary.json records the fit's own time per
family (`fit_time_s`) and each baseline's wall time (`baselines.<name>.<family>.time_s`). Reported:
the ratio of baseline time to fit time per family, and the MoBE cost model: every MoBE Adam step
touches all E experts of a layer, L layers in turn, so its cost grows like L * E / batch_size times
the fit's per-step cost (the arithmetic for Qwen1.5-MoE-A2.7B is in the JSON, labelled as such).

    python benchmarks/bench_baselines.py [--steps 2000] [--threads 1]
Writes benchmarks/results/baselines_fixture.json.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from usage import Parser

from globe.config import GlobeConfig
from globe.fit.run import run_fit
from globe.io.checkpoint import Checkpoint
from globe.testing.models import fixture_path


def main() -> None:
    ap = Parser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ck = Checkpoint(fixture_path())
    out = {"model": str(fixture_path()), "steps": a.steps, "threads": a.threads, "runs": {},
           "loadavg_1min_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, mobe in (("default (svd only)", False), ("with train.baseline_mobe=true", True)):
            cfg = GlobeConfig.from_dict({"model": {"path": str(fixture_path())}, "output_dir": f"{tmp}/{int(mobe)}",
                                         "bank": {"r_frac": 0.5},  # r = p/2, as when these numbers were committed
                                         "train": {"steps": a.steps, "baseline_mobe": mobe, "device": "cpu"}})
            t = time.time()
            s = run_fit(cfg, progress=False)
            run = {"wall_s": time.time() - t, "families": {}}
            for fam, f in s["families"].items():
                b = {k: s["baselines"][k][fam]["time_s"] for k in s["baselines"]}
                run["families"][fam] = {"fit_time_s": f["fit_time_s"], "baseline_time_s": b,
                                        "baselines_over_fit": f["baselines_time_s"] / f["fit_time_s"],
                                        "rel_fro_error": f["rel_fro_error"],
                                        **{f"{k}_rel_fro_error": s["baselines"][k][fam]["rel_fro_error"]
                                           for k in s["baselines"]}}
            out["runs"][name] = run
            print(name, json.dumps(run), flush=True)
    L, E, bs = len(ck.moe_layers), ck.num_experts, GlobeConfig().train.batch_size
    out["mobe_cost_model"] = {
        "fixture": {"layers": L, "experts_per_layer": E, "batch_size": bs, "L_E_over_batch": L * E / bs},
        "qwen15_moe_a2_7b_arithmetic": {"layers": 24, "experts_per_layer": 60, "batch_size": 16,
                                        "L_E_over_batch": 24 * 60 / 16,
                                        "note": "arithmetic, not measured: MoBE expert-updates per fit expert-update"}}
    path = Path(__file__).parent / "results" / "baselines_fixture.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

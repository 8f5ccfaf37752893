"""Wall time of `globe` commands with OpenMP's default wait policy against OMP_WAIT_POLICY=PASSIVE, on a
quiet machine and next to competing busy processes.

Why: the CLI sets OMP_WAIT_POLICY=PASSIVE (globe/cli/process.py) because libgomp's idle threads spin after
each parallel region, and on a machine where something else wants the cores they take its time slices
(a new user saw a 30-step fixture fit take 103 s instead of 16 s while other jobs ran). Sleeping threads
wake more slowly, which may cost small-op work (decode steps) on a quiet machine; this measures both.

Each run is one `globe` process (the CLI's own entry, with globe.cli.process.OMP_WAIT_POLICY set to None
for the default arm), arms alternating pair by pair; `--load K` competing processes each spin a pure
Python loop on a core for the loaded condition. Workloads: `demo` (`globe demo --fast`: fit 60 steps,
export, two evals) and `eval` (`globe eval` of the bundled fixture with the speed pass: prefill 128 and 32
decode steps; its decode tok/s is read from the eval JSON). Reports medians and the PASSIVE/default
ratio of every pair.

    python benchmarks/bench_omp_wait.py    # -> benchmarks/results/omp_wait_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = ("import sys; import globe.cli.process as p; p.OMP_WAIT_POLICY = None if sys.argv[1] == 'default' "
         "else sys.argv[1]; from globe.cli.main import main; sys.exit(main(sys.argv[2:]))")
ARMS = ("default", "PASSIVE")


def argv_for(work: str, tmp: Path, i: int) -> list[str]:
    from globe.fixtures import FIXTURE_DIR

    if work == "demo":
        return ["demo", "--fast", "--out", str(tmp / f"demo{i}")]
    return ["eval", f"model.path={FIXTURE_DIR}", f"eval.text={FIXTURE_DIR / 'eval.txt'}", "eval.max_tokens=512",
            "eval.speed=true", "eval.prefill_tokens=128", "eval.decode_tokens=32", f"output={tmp / f'ev{i}.json'}"]


def one(work: str, arm: str, tmp: Path, i: int, env: dict[str, str]) -> dict:
    argv = argv_for(work, tmp, i)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, arm, *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        sys.exit(f"{work} {arm} failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-2:]}")
    row = {"wall_s": wall}
    if work == "eval":
        ev = json.loads((tmp / f"ev{i}.json").read_text())
        row["decode_tok_s"] = ev["decode_tok_s"]
        row["prefill_tok_s"] = ev["prefill_tok_s"]
    return row


def spinners(k: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", nargs="+", default=["eval", "demo"], choices=["eval", "demo"])
    ap.add_argument("--rounds", type=int, default=3, help="pairs (default, PASSIVE) per workload and condition")
    ap.add_argument("--load", type=int, default=1, help="competing busy processes in the loaded condition")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the globe processes")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "omp_wait_cpu.json"))
    a = ap.parse_args()
    if a.rounds < 1 or a.load < 1 or a.threads < 1:
        sys.exit("--rounds, --load and --threads must be >= 1")
    out_path = Path(a.out)
    if not out_path.parent.is_dir():
        sys.exit(f"--out: no directory {out_path.parent}")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_NUM_THREADS=str(a.threads), GLOBE_PROGRESS_EVERY_S="3600")
    runs: dict = {}
    i = 0
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for cond in ("quiet", f"load{a.load}"):
            procs = spinners(a.load) if cond != "quiet" else []
            try:
                for work in a.work:
                    rows = runs.setdefault(cond, {}).setdefault(work, {arm: [] for arm in ARMS})
                    one(work, "PASSIVE", tmp, i := i + 1, env)  # warm-up: file cache, imports
                    for _ in range(a.rounds):
                        for arm in ARMS:
                            rows[arm].append(one(work, arm, tmp, i := i + 1, env))
                        print(cond, work, {arm: round(rows[arm][-1]["wall_s"], 2) for arm in ARMS}, flush=True)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    summary: dict = {}
    for cond, works in runs.items():
        for work, rows in works.items():
            ratios = [p["wall_s"] / d["wall_s"] for d, p in zip(rows["default"], rows["PASSIVE"], strict=True)]
            s = {f"{arm}_wall_s_median": statistics.median(r["wall_s"] for r in rows[arm]) for arm in ARMS}
            s["passive_over_default_wall"] = {"median": statistics.median(ratios), "min": min(ratios),
                                              "max": max(ratios)}
            if work == "eval":
                s.update({f"{arm}_decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in rows[arm])
                          for arm in ARMS})
            summary[f"{cond}/{work}"] = s
    res = {"threads": a.threads, "rounds": a.rounds, "load_processes": a.load, "cpus": os.cpu_count(),
           "runs": runs, "summary": summary, "loadavg_end": os.getloadavg()}
    tmp_out = out_path.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp_out, out_path)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

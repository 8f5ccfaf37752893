"""Wall time of `globe` commands under OpenMP wait settings (libgomp's default spin, OMP_WAIT_POLICY=PASSIVE,
GOMP_SPINCOUNT=N), on a quiet machine and next to competing busy processes.

Why: libgomp's idle threads spin after each parallel region, and on a machine where something else wants
the cores they take its time slices (a new user saw a 30-step fixture fit take 103 s instead of 16 s while
other jobs ran). Threads that sleep at once wake more slowly, which costs small-op work (decode steps) on a
quiet machine. The CLI's choice (globe/cli/process.py: GOMP_SPINCOUNT=3000) comes from this benchmark.

Each run is one `globe` process (the CLI's own entry; its own setting switched off except in the `cli`
arm), arms alternating run by run; `--load K` competing processes each spin a pure
Python loop on a core for the loaded condition. Workloads: `demo` (`globe demo --fast`: fit 60 steps,
export, two evals) and `eval` (`globe eval` of the bundled fixture with the speed pass: prefill 128 and 32
decode steps; its decode tok/s is read from the eval JSON). Reports medians and each arm's ratio to the
first arm, round by round. SPIN:N arms (GOMP_SPINCOUNT=N) spin briefly before sleeping: a middle way.

    python benchmarks/bench_omp_wait.py    # -> benchmarks/results/omp_wait_cpu.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from usage import Parser, die

ROOT = Path(__file__).resolve().parents[1]
# arm: "default" (libgomp's own: spin about 300,000 rounds, then sleep), "PASSIVE" (OMP_WAIT_POLICY=PASSIVE:
# sleep at once), "SPIN:N" (GOMP_SPINCOUNT=N: spin N rounds, then sleep) or "cli" (what the `globe` CLI sets:
# globe.cli.process.quiet_openmp); every arm but "cli" runs the CLI with that setting switched off
CHILD = ("import sys; import globe.cli.process as p; p.SPIN_COUNT = p.SPIN_COUNT if sys.argv[1] == 'cli' else None; "
         "from globe.cli.main import main; sys.exit(main(sys.argv[2:]))")


def argv_for(work: str, tmp: Path, i: int) -> list[str]:
    from globe.fixtures import FIXTURE_DIR

    if work == "demo":
        return ["demo", "--fast", "--out", str(tmp / f"demo{i}")]
    return ["eval", f"model.path={FIXTURE_DIR}", f"eval.text={FIXTURE_DIR / 'eval.txt'}", "eval.max_tokens=512",
            "eval.speed=true", "eval.prefill_tokens=128", "eval.decode_tokens=32", f"output={tmp / f'ev{i}.json'}"]


def one(work: str, arm: str, tmp: Path, i: int, env: dict[str, str]) -> dict:
    argv = argv_for(work, tmp, i)
    if arm.startswith("SPIN:"):
        env = {**env, "GOMP_SPINCOUNT": arm.split(":", 1)[1]}
    elif arm == "PASSIVE":
        env = {**env, "OMP_WAIT_POLICY": "PASSIVE"}
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
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", nargs="+", default=["eval", "demo"], choices=["eval", "demo"])
    ap.add_argument("--arms", nargs="+", default=["default", "PASSIVE", "SPIN:3000", "SPIN:30000"],
                    help="default | PASSIVE | SPIN:N (GOMP_SPINCOUNT=N) | cli (the CLI's own setting); the first is "
                         "the baseline of the ratios")
    ap.add_argument("--rounds", type=int, default=3, help="runs of every arm per workload and condition")
    ap.add_argument("--load", type=int, default=1, help="competing busy processes in the loaded condition")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the globe processes")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "omp_wait_cpu.json"))
    a = ap.parse_args()
    if a.rounds < 1 or a.load < 1 or a.threads < 1:
        die("--rounds, --load and --threads must be >= 1")
    bad = [x for x in a.arms
           if x not in ("default", "PASSIVE", "cli") and not (x.startswith("SPIN:") and x[5:].isdigit())]
    if bad or len(set(a.arms)) < 2:
        die(f"--arms: two or more of default, PASSIVE, SPIN:N, cli (got {a.arms})")
    arms = a.arms
    out_path = Path(a.out)
    if not out_path.parent.is_dir():
        die(f"--out: no directory {out_path.parent}")
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
                    rows = runs.setdefault(cond, {}).setdefault(work, {arm: [] for arm in arms})
                    one(work, arms[0], tmp, i := i + 1, env)  # warm-up: file cache, imports
                    for _ in range(a.rounds):
                        for arm in arms:
                            rows[arm].append(one(work, arm, tmp, i := i + 1, env))
                        print(cond, work, {arm: round(rows[arm][-1]["wall_s"], 2) for arm in arms}, flush=True)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    summary: dict = {}
    for cond, works in runs.items():
        for work, rows in works.items():
            s = {f"{arm}_wall_s_median": statistics.median(r["wall_s"] for r in rows[arm]) for arm in arms}
            for arm in arms[1:]:  # ratio to the baseline arm, run by run (same round)
                ratios = [x["wall_s"] / b["wall_s"] for b, x in zip(rows[arms[0]], rows[arm], strict=True)]
                s[f"{arm}_over_{arms[0]}_wall"] = {"median": statistics.median(ratios), "min": min(ratios),
                                                   "max": max(ratios)}
            if work == "eval":
                s.update({f"{arm}_decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in rows[arm])
                          for arm in arms})
            summary[f"{cond}/{work}"] = s
    res = {"arms": arms, "threads": a.threads, "rounds": a.rounds, "load_processes": a.load, "cpus": os.cpu_count(),
           "runs": runs, "summary": summary, "loadavg_end": os.getloadavg()}
    tmp_out = out_path.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp_out, out_path)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Speed and resident memory of one full-size Qwen1.5-MoE layer in cache.mode=none under glibc malloc settings.

Why: the `globe` CLI freezes glibc's mmap threshold at 128 KiB (globe/cli/process.py) so tensors of a few
MiB go back to the system when freed instead of fragmenting the heap (at full size the eval's resident
memory crept up window after window: benchmarks/bench_eval_memory.py). Mmapped tensors are zero-filled by
the kernel on first touch each time, so this measures what the setting costs. Each child (one process per
setting, settings alternating across rounds) builds the layer of bench_lazy_compose.py (E = 60, d = 2048,
p = 1408, r = 704, m = 128, support 25, bf16, top-4), then runs `--windows` times: a prefill of
`--tokens` tokens and `--decode` one-token steps, each with fresh routing, through the runtime's `none`
path (every block composed per call). Reports seconds per prefill and per decode step, and RSS growth.

    python benchmarks/bench_malloc.py    # -> benchmarks/results/malloc_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from usage import Parser

ROOT = Path(__file__).resolve().parents[1]


def child(a) -> dict:
    import psutil
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_lazy_compose import layer

    from globe.cli.process import bound_malloc
    from globe.runtime.cache import SlabCache
    from globe.runtime.kernels import active_experts, experts_forward

    applied = bound_malloc(int(a.setting)) if a.setting != "off" else False
    torch.set_num_threads(a.threads)
    E, d, r, k, dt = 60, 2048, 704, 4, torch.bfloat16
    lw, compose = layer(E, d, 1408, r, 128, 25, dt)
    proc = psutil.Process()

    def run(T: int, seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(T, d, generator=g).to(dt)
        w, idx = torch.topk(torch.randn(T, E, generator=g).softmax(-1), k)
        t = time.perf_counter()
        act, counts = active_experts(idx, E)
        cache = SlabCache(0, E, (2 * r, d), dt, "cpu", compose)
        experts_forward(h, idx, w, lw, cache.lookup(act, counts), "grouped", counts)
        return time.perf_counter() - t

    run(a.tokens, 0)  # first touch of the weights
    rss0 = proc.memory_info().rss
    prefill, decode = [], []
    for win in range(a.windows):
        prefill.append(run(a.tokens, 1000 + win))
        decode += [run(1, 10_000 * (win + 1) + s) for s in range(a.decode)]
    return {"applied": applied, "prefill_s": sum(prefill) / len(prefill), "decode_s": sum(decode) / len(decode),
            "rss_growth_gb": (proc.memory_info().rss - rss0) / 1e9}


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["off", "131072", "65536"],
                    help="off (glibc's dynamic threshold) or a frozen threshold in bytes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "malloc_cpu.json"))
    ap.add_argument("--setting", default=None, help=argparse.SUPPRESS)  # (internal) run one child
    a = ap.parse_args()
    if a.setting is not None:
        print(json.dumps(child(a)))
        return
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(OMP_NUM_THREADS=str(a.threads), ONEDNN_PRIMITIVE_CACHE_CAPACITY="128")  # as the CLI runs
    runs: dict[str, list[dict]] = {s: [] for s in a.settings}
    for _ in range(a.rounds):
        for s in a.settings:
            cmd = [sys.executable, __file__, "--setting", s, "--windows", str(a.windows), "--tokens", str(a.tokens),
                   "--decode", str(a.decode), "--threads", str(a.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"setting {s} failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-3:]}")
            runs[s].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(s, runs[s][-1], flush=True)
    base = a.settings[0]

    def mean(s: str, key: str) -> float:
        return sum(r[key] for r in runs[s]) / len(runs[s])
    summary = {s: {"prefill_time_over_" + base: mean(s, "prefill_s") / mean(base, "prefill_s"),
                   "decode_time_over_" + base: mean(s, "decode_s") / mean(base, "decode_s"),
                   "rss_growth_gb": mean(s, "rss_growth_gb")} for s in a.settings}
    res = {"layer": {"E": 60, "d": 2048, "p": 1408, "r": 704, "m": 128, "support": 25, "top_k": 4, "dtype": "bf16"},
           "mode": "none", "tokens": a.tokens, "decode_steps": a.decode, "windows": a.windows, "rounds": a.rounds,
           "threads": a.threads, "runs": runs, "summary": summary, "loadavg": os.getloadavg()}
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

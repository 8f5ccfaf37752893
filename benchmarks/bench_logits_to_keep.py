"""lm_head at Qwen1.5-MoE's vocabulary: transformers' int `logits_to_keep` (a view) vs `compat.keep_last` (indices).

Why: with an int n, transformers projects hidden_states[:, -n:, :], a (1, n, d) view whose batch stride
is still T * d; torch's CPU bf16 `linear` takes a slow path for it when the weight does not require grad
(as in globe.load_model's models and this script), whose resident peak holds another copy of the
(151,936 x 2048) weight. Perplexity's last window (255 of 256 scored), strided windows and every
prefill of a decode (1 of T) hit it. This times `F.linear` on the view and on the indexed copy that
`globe.compat.keep_last` makes transformers take, T = 256, n in {255, 128, 1}, with peak RSS above the
start of each call (sampled every 1 ms), alternating over rounds, and checks the outputs are equal.

    python benchmarks/bench_logits_to_keep.py    # -> benchmarks/results/logits_to_keep_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from globe.compat import keep_last  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "logits_to_keep_cpu.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    proc, peak = psutil.Process(), [0]

    def sample():
        while True:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    threading.Thread(target=sample, daemon=True).start()
    g = torch.Generator().manual_seed(0)
    V, d, T = 151_936, 2048, a.tokens
    W = (torch.randn(V, d, generator=g) * 0.02).bfloat16()
    h = torch.randn(1, T, d, generator=g).bfloat16()

    def call(x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        peak[0] = r0 = proc.memory_info().rss
        t = time.perf_counter()
        with torch.no_grad():
            y = F.linear(x, W)
        return y, time.perf_counter() - t, (peak[0] - r0) / 1e9

    rows = {}
    for n in (T - 1, T // 2, 1):
        r = rows[str(n)] = {"view_s": [], "view_peak_gb": [], "index_s": [], "index_peak_gb": []}
        for _ in range(a.rounds):
            yv, s, pk = call(h[:, -n:, :])  # what transformers does with logits_to_keep=n
            r["view_s"].append(s)
            r["view_peak_gb"].append(pk)
            yi, s, pk = call(h[:, keep_last(n, T), :])  # with logits_to_keep=keep_last(n, T)
            r["index_s"].append(s)
            r["index_peak_gb"].append(pk)
            r["equal"] = bool(torch.equal(yv, yi))
            del yv, yi
        r["view_over_index_time"] = sum(r["view_s"]) / sum(r["index_s"])
        print(n, json.dumps({k: r[k] for k in ("view_over_index_time", "equal")}), flush=True)
    res = {"vocab": V, "d": d, "tokens": T, "dtype": "bf16", "threads": a.threads, "rounds": a.rounds,
           "kept": rows, "torch": torch.__version__, "loadavg": os.getloadavg()}
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

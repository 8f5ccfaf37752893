"""lm_head at Qwen1.5-MoE's vocabulary on transformers' `logits_to_keep` slice, bare vs with globe's pre-hook.

Why: with logits_to_keep=n transformers projects hidden_states[:, -n:, :], a (1, n, d) view whose batch
stride is still T * d; torch's CPU bf16 `linear` takes a slow path for it when the weight does not require
grad (as in globe.load_model's models), whose resident peak holds another copy of the (151,936 x 2048)
weight. Perplexity's last window (255 of 256 scored), strided windows and every prefill of a decode (1 of
T) hit it. This times the same bf16 Linear (weight not requiring grad) on that view, without and with
`globe.compat.canonical_lm_head_input` (which re-views the input), T = 256, n in {255, 128, 1}, with the
peak RSS above the start of each call (globe.eval.speed.RssSampler, every 1 ms), alternating over rounds,
and checks the outputs are equal.

    python benchmarks/bench_logits_to_keep.py    # -> benchmarks/results/logits_to_keep_cpu.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from usage import Parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from globe.compat import canonical_lm_head_input  # noqa: E402
from globe.eval.speed import RssSampler  # noqa: E402


class Head(nn.Module):
    """The minimal model the hook installer reads: get_output_embeddings() -> the Linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.lm_head = linear

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "logits_to_keep_cpu.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    V, d, T = 151_936, 2048, a.tokens
    weight = nn.Parameter((torch.randn(V, d, generator=g, dtype=torch.bfloat16) * 0.02), requires_grad=False)
    bare, hooked = nn.Linear(d, V, bias=False), nn.Linear(d, V, bias=False)
    bare.weight = hooked.weight = weight  # one weight, two modules: only `hooked` gets the pre-hook
    canonical_lm_head_input(Head(hooked))
    h = torch.randn(1, T, d, generator=g).bfloat16()

    def call(mod: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        with torch.no_grad(), RssSampler(period=0.001) as rss:
            r0 = rss.peak
            t = time.perf_counter()
            y = mod(x)
            s = time.perf_counter() - t
        return y, s, (rss.peak - r0) / 1e9

    rows = {}
    for n in (T - 1, T // 2, 1):
        r = rows[str(n)] = {"bare_s": [], "bare_peak_gb": [], "hooked_s": [], "hooked_peak_gb": []}
        for _ in range(a.rounds):
            outs = []
            for name, mod in (("bare", bare), ("hooked", hooked)):
                y, s, pk = call(mod, h[:, -n:, :])  # what transformers passes with logits_to_keep=n
                r[f"{name}_s"].append(s)
                r[f"{name}_peak_gb"].append(pk)
                outs.append(y)
            r["equal"] = bool(torch.equal(*outs))
            del outs, y
        r["bare_over_hooked_time"] = sum(r["bare_s"]) / sum(r["hooked_s"])
        print(n, json.dumps({k: r[k] for k in ("bare_over_hooked_time", "equal")}), flush=True)
    res = {"vocab": V, "d": d, "tokens": T, "dtype": "bf16", "threads": a.threads, "rounds": a.rounds,
           "kept": rows, "torch": torch.__version__, "loadavg": os.getloadavg()}
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

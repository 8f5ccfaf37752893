"""Fit GloBE banks on an MoE checkpoint from Python (the library API behind `globe fit`).

    python examples/train_qwen_moe.py                       # bundled fixture, short schedule
    python examples/train_qwen_moe.py --model Qwen/Qwen1.5-MoE-A2.7B --out runs/qwen --steps 2000

For Qwen1.5-MoE-A2.7B on a 24 GB laptop: each family holds 1440 experts of 1408 x 2048 (8.3 GB in
bf16); experts stay in bf16 and are cast to fp32 per minibatch (train.max_memory_gb).
"""

from __future__ import annotations

import argparse
import json

from globe import BankCfg, FitCfg, SparsityCfg, TrainCfg, compress
from globe.fixtures import FIXTURE_DIR


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(FIXTURE_DIR))
    ap.add_argument("--out", default="runs/example-fit")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--m", type=int, default=32, help="atoms per bank")
    ap.add_argument("--r-frac", type=float, default=0.5)
    ap.add_argument("--support", type=int, default=8)
    a = ap.parse_args()
    fit = FitCfg(bank=BankCfg(m_up=a.m, m_gate=a.m, r_frac=a.r_frac),
                 sparsity=SparsityCfg(target_support=a.support),
                 train=TrainCfg(steps=a.steps, eval_every=min(100, a.steps)))
    summary = compress(a.model, a.out, fit)
    print(json.dumps(summary["families"], indent=2))


if __name__ == "__main__":
    main()

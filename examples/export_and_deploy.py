"""Export a fit two ways and load each in the tools users already have.

    python examples/export_and_deploy.py --artifacts runs/example-fit --out runs/example

- `globe` format: compressed directory; `globe.load_model` rebuilds the patched model (tilde_B cache).
- `dense` format: a standard checkpoint; plain `AutoModelForCausalLM.from_pretrained` (or vLLM's
  `LLM(model=...)`) loads it without importing globe.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from globe import export, load_model
from globe.config import ExportCfg
from globe.fixtures import FIXTURE_DIR


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(FIXTURE_DIR))
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--out", default="runs/example")
    ap.add_argument("--prompt", default="The Python standard library")
    a = ap.parse_args()
    outs = {}
    for fmt in ("globe", "dense"):
        outs[fmt] = export(a.model, a.artifacts, f"{a.out}-{fmt}", ExportCfg(format=fmt, dtype="fp32"))
    tok = AutoTokenizer.from_pretrained(outs["dense"])
    ids = tok(a.prompt, return_tensors="pt").input_ids
    compressed = load_model(outs["globe"])
    dense = AutoModelForCausalLM.from_pretrained(outs["dense"], dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (compressed(ids).logits - dense(ids).logits).abs().max().item()
        gen = dense.generate(ids, max_new_tokens=24, do_sample=False)
    print(f"max |logit difference| globe vs dense export: {diff:.2e}")
    print(tok.decode(gen[0]))


if __name__ == "__main__":
    main()

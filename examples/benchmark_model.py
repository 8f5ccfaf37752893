"""Compare an original checkpoint with its compressed export: perplexity, speed, memory.

    python examples/benchmark_model.py --original PATH --compressed OUT [--text FILE]

The same numbers come from `globe eval model.path=... eval.speed=true`; this script runs both models
with one configuration and prints the ratios.
"""

from __future__ import annotations

import argparse
import json

from globe import EvalCfg, evaluate
from globe.fixtures import FIXTURE_DIR


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--original", default=str(FIXTURE_DIR))
    ap.add_argument("--compressed", required=True)
    ap.add_argument("--text", default=str(FIXTURE_DIR / "eval.txt"))
    ap.add_argument("--max-tokens", type=int, default=8192)
    a = ap.parse_args()
    res = {}
    for name, path in (("original", a.original), ("compressed", a.compressed)):
        res[name] = evaluate(path, EvalCfg(text=a.text, speed=True, max_tokens=a.max_tokens))
    o, c = res["original"], res["compressed"]
    res["ratios"] = {k: c[k] / o[k] for k in ("perplexity", "prefill_tok_s", "decode_tok_s", "peak_mem_bytes")
                     if o.get(k) and c.get(k)}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

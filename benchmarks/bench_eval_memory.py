"""Resident memory of scoring a big globe export window by window, per oneDNN cache size and CE chunking.

Why: at full size the weights are 18.47 GB and the issue's target is <= 20 GB per phase, so what an
eval adds on top matters. Two things were found to add to it: oneDNN (torch's CPU bf16 matmul) caches
one primitive per GEMM shape (up to 1024 by default) and an MoE layer sees a new row count per expert
per call, so resident memory grows window after window; and the cross-entropy of a window upcast the
whole (256, 151,936) logits to fp32 at once. Each setting runs in its own process (the cache size is
read by oneDNN at its first primitive): load, then `--windows` windows of `--context` tokens scored with
`globe.eval.perplexity.perplexity`, RSS after each and the sampled peak (every 3 ms).

    python benchmarks/bench_fullsize.py --ckpt CKPT --work WORK --phases export_globe   # WORK/export-globe
    python benchmarks/bench_eval_memory.py --export WORK/export-globe --mode none --windows 3

-> benchmarks/results/eval_memory_fullsize.json. Settings: `default` leaves ONEDNN_PRIMITIVE_CACHE_CAPACITY
unset (oneDNN's 1024), a number sets it; `ce_rows` is `nll_sum`'s rows per fp32 chunk (0: the whole window).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from usage import Parser, check_out, check_threads, die

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "eval_memory_fullsize.json"
TEXT = ROOT / "globe" / "fixture" / "qwen2moe-tiny" / "eval.txt"


def child(a) -> dict:
    import psutil
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(a.threads)
    proc, peak, stop = psutil.Process(), [0], [False]

    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.003)

    threading.Thread(target=sample, daemon=True).start()
    from transformers import AutoTokenizer

    import globe
    import globe.eval.perplexity as P
    from globe.config import CacheCfg

    P.CE_ROWS = a.ce_rows or 10**9  # 0: the whole window at once (the code before this benchmark)
    t0 = time.time()
    model = globe.load_model(a.export, cache=CacheCfg(mode=a.mode, S_per_layer=a.S))
    tok = AutoTokenizer.from_pretrained(a.export)
    ids = P.tokenize(tok, TEXT.read_text(), a.windows * a.context + 1)
    rows = [{"after": "load", "rss_gb": proc.memory_info().rss / 1e9, "peak_gb": peak[0] / 1e9,
             "s": time.time() - t0}]
    for w in range(a.windows):
        t = time.time()
        res = P.perplexity(model, ids[w * a.context: (w + 1) * a.context + 1], a.context)
        rows.append({"after": f"window {w}", "rss_gb": proc.memory_info().rss / 1e9, "peak_gb": peak[0] / 1e9,
                     "s": time.time() - t, "nll_sum": res["nll_sum"]})
    stop[0] = True
    return {"rows": rows, "peak_gb": peak[0] / 1e9,
            "growth_after_load_gb": rows[-1]["rss_gb"] - rows[0]["rss_gb"],
            "transient_gb": max(r["peak_gb"] for r in rows[1:]) - rows[-1]["rss_gb"]}


def parse_setting(s: str) -> tuple[str, int, dict[str, str]]:
    """'CACHE:CE_ROWS[:VAR=VALUE,...]' -> (CACHE, CE_ROWS, {VAR: VALUE}); exits with one line when malformed."""
    cache, _, rest = s.partition(":")
    rows, _, extra = rest.partition(":")
    env = {}
    for kv in filter(None, extra.split(",")):
        k, eq, v = kv.partition("=")
        if not eq or not k.isidentifier():
            die(f"--settings {s!r}: {kv!r} is not VAR=VALUE")
        env[k] = v
    if not (cache == "default" or cache.isdigit()) or not rows.isdigit():
        die(f"--settings {s!r}: expected CACHE:CE_ROWS[:VAR=VALUE,...] with CACHE 'default' or an integer "
                 "and CE_ROWS an integer (0: the whole window)")
    return cache, int(rows), env


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True, help="a globe export directory")
    ap.add_argument("--mode", default="none", help="cache.mode (default: %(default)s)")
    ap.add_argument("--S", type=int, default=8, help="cache.S_per_layer with --mode lru (default: %(default)s)")
    ap.add_argument("--windows", type=int, default=3, help="windows scored (default: %(default)s)")
    ap.add_argument("--context", type=int, default=256, help="tokens per window (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each child (default: %(default)s)")
    ap.add_argument("--settings", nargs="+", default=["default:32", "128:32", "0:32", "128:0"],
                    help="CACHE:CE_ROWS[:VAR=VALUE,...] (CACHE: default or a number; the optional third field sets "
                         "environment variables of the child, e.g. glibc's MALLOC_MMAP_THRESHOLD_=65536)")
    ap.add_argument("--out", default=str(OUT), help="results JSON (default: the committed %(default)s)")
    ap.add_argument("--child", default=None, help="(internal) run one setting, write its JSON here")
    ap.add_argument("--ce-rows", type=int, default=32)
    ap.add_argument("--merge", action="store_true", help="keep the other settings already in --out")
    a = ap.parse_args()
    if a.child:
        Path(a.child).write_text(json.dumps(child(a)))
        return
    parsed = {s: parse_setting(s) for s in a.settings}  # every setting checked before the first child
    if not (Path(a.export) / "config.json").is_file():
        die(f"--export: {a.export} is not a model directory (no config.json)")
    if a.mode not in ("full", "lru", "none") or min(a.S, a.windows, a.context, a.threads) < 1:
        die("--mode must be full, lru or none; --S, --windows, --context and --threads >= 1")
    check_out(a.out)
    check_threads(a.threads)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    res = {"export": a.export, "mode": a.mode, "S_per_layer": a.S if a.mode == "lru" else None,
           "windows": a.windows, "context": a.context, "threads": a.threads, "settings": {}}
    if a.merge and Path(a.out).exists():  # add these settings to a file measured the same way
        old = json.loads(Path(a.out).read_text())
        if any(old.get(k) != res[k] for k in ("mode", "S_per_layer", "windows", "context", "threads")):
            die(f"--merge: {a.out} was measured with other mode/windows/context/threads")
        res["settings"] = old["settings"]
    for s, (cache, rows, extra) in parsed.items():
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), **extra}
        env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
        if cache != "default":
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = cache
        res_file = Path(a.out).with_suffix(".child.json")
        res_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--child", str(res_file), "--export", a.export, "--mode", a.mode,
               "--S", str(a.S), "--windows", str(a.windows), "--context", str(a.context), "--threads", str(a.threads),
               "--ce-rows", str(rows)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode or not res_file.exists():
            sys.exit(f"setting {s} failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-3:]}")
        r = json.loads(res_file.read_text())
        res_file.unlink()
        r.update(onednn_cache=cache, ce_rows=rows, env=",".join(f"{k}={v}" for k, v in extra.items()),
                 loadavg=os.getloadavg())
        res["settings"][s] = r
        print(s, json.dumps({k: r[k] for k in ("peak_gb", "growth_after_load_gb", "transient_gb")}), flush=True)
        tmp = Path(a.out).with_suffix(".tmp")  # never a half-written results file
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, a.out)


if __name__ == "__main__":
    main()

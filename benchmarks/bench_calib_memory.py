"""Peak memory and time of the calibration pass: layer-wise (one decoder layer at a time, what
`globe fit train.objective=activation` runs) against the whole model loaded by from_pretrained in
fp32 (the previous path), on a Qwen2-MoE with the real Qwen1.5-MoE-A2.7B expert and hidden sizes
(experts of 1408 x 2048, shared expert 5632, top-4) but `--layers` layers of `--experts` experts (to stay
within this shared machine's memory), bf16 on disk, random weights, vocab 1024.

The model is built and saved in one subprocess; each path then runs in a fresh subprocess (peak =
VmHWM of that process, reset at exec) over the same random token ids (no tokenizer is needed:
`calib.calib_ids` is replaced), collecting per-layer covariances and row weights
(`calib.calibration_stats(..., rows=True)`); the results of both paths are compared.

    python benchmarks/bench_calib_memory.py [--layers 4] [--experts 16] [--tokens 512] [--threads 1]
Writes benchmarks/results/calib_memory.json.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from usage import Parser

CHILD = r"""
import json, sys
sys.path.insert(0, {root!r})
from benchmarks.bench_calib_memory import child
print("RESULT " + json.dumps(child({path!r}, {mode!r}, {tokens}, {threads}, {out!r})))
"""
MAKE = r"""
import json, sys
sys.path.insert(0, {root!r})
from benchmarks.bench_calib_memory import make
print("RESULT " + json.dumps(make({path!r}, {layers}, {experts})))
"""


def vm_hwm() -> int:
    """Peak resident set of this process since exec (bytes), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make(path: str, layers: int, experts: int) -> dict:
    from globe.testing.models import real_dim_model, save_model

    m = real_dim_model(num_layers=layers, num_experts=experts)
    save_model(m, path)
    return {"one_decoder_layer_fp32_bytes": sum(p.numel() for p in m.model.layers[0].parameters()) * 4,
            "whole_model_fp32_bytes": sum(p.numel() for p in m.parameters()) * 4}


def _run(code: str) -> dict:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])


def whole_model_pass(ck, ids, context, make_hook):
    """The previous path: the whole model in fp32 via from_pretrained, experts' input hooked."""
    from transformers import AutoModelForCausalLM

    from globe import compat

    model = AutoModelForCausalLM.from_pretrained(ck.dir, dtype=torch.float32).eval()

    def wrap(fn):
        def pre(_mod, args, kwargs):
            x = args[0].reshape(-1, args[0].shape[-1])
            fn(x, args[1].reshape(x.shape[0], -1))
        return pre
    hooks = [compat.get_experts(model, L).register_forward_pre_hook(wrap(make_hook(L, compat.get_experts(model, L))),
                                                                    with_kwargs=True) for L in ck.moe_layers]
    with torch.no_grad():
        for a in range(0, ids.numel(), context):
            model(ids[a:a + context][None])
    for h in hooks:
        h.remove()


def child(path: str, mode: str, tokens: int, threads: int, out: str) -> dict:
    from globe.fit import calib
    from globe.io.checkpoint import Checkpoint

    torch.set_num_threads(threads)
    ck = Checkpoint(path)
    ids = torch.randint(int(ck.config["vocab_size"]), (tokens,), generator=torch.Generator().manual_seed(0))
    calib.calib_ids = lambda *a: ids
    if mode == "whole_model":
        calib._calib_pass = lambda ck_, text, n, ctx, make, progress=None: whole_model_pass(ck_, ids, ctx, make)
    base = vm_hwm()
    t = time.time()
    covs, _, rows, _, _ = calib.calibration_stats(ck, "unused", tokens, rows=True, progress=False)
    secs = time.time() - t
    torch.save({"covs": covs, "rows": rows}, out)
    return {"seconds": secs, "peak_rss_bytes": vm_hwm(), "peak_rss_before_calibration_bytes": base}


def main() -> None:
    ap = Parser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    root = str(Path(__file__).resolve().parents[1])
    res: dict = {"tokens": a.tokens, "threads": a.threads,
                 "model": f"real_dim_model(num_layers={a.layers}, num_experts={a.experts}), bf16 on disk",
                 "loadavg_1min_start": os.getloadavg()[0], "paths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model")
        res.update(_run(MAKE.format(root=root, path=path, layers=a.layers, experts=a.experts)))
        for mode in ("layer_wise", "whole_model"):
            out = str(Path(tmp) / f"{mode}.pt")
            res["paths"][mode] = _run(CHILD.format(root=root, path=path, mode=mode, tokens=a.tokens,
                                                   threads=a.threads, out=out))
            print(mode, res["paths"][mode], flush=True)
        r1, r2 = torch.load(Path(tmp) / "layer_wise.pt"), torch.load(Path(tmp) / "whole_model.pt")
        res["identical_results"] = (all(torch.equal(r1["covs"][k], r2["covs"][k]) for k in r1["covs"])
                                    and all(torch.equal(r1["rows"][f], r2["rows"][f]) for f in r1["rows"]))
    lw, wm = res["paths"]["layer_wise"], res["paths"]["whole_model"]
    res["peak_ratio_layer_wise_over_whole"] = lw["peak_rss_bytes"] / wm["peak_rss_bytes"]
    res["layer_wise_peak_over_one_layer_fp32"] = lw["peak_rss_bytes"] / res["one_decoder_layer_fp32_bytes"]
    path = Path(__file__).parent / "results" / "calib_memory.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

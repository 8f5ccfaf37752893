"""Peak memory of reading every routed expert of a real-dimension checkpoint.

Target (Foundation issue): reading all experts keeps peak RSS below 2x the largest tensor plus
interpreter overhead. Builds a Qwen2-MoE with Qwen1.5-MoE-A2.7B layer sizes (2 layers, bf16,
random weights), saves it, then in fresh subprocesses reads every expert (gate, up, down) with
globe's reader and, as the baseline in the same run, with safetensors' memory-mapped `safe_open`.

Run: python benchmarks/bench_reader.py [--layers 2] -> benchmarks/results/reader_memory.json
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from usage import Parser

CHILD = r"""
import json, sys, time
import torch
from globe.io.checkpoint import Checkpoint
def status_kb(key):
    return int(open('/proc/self/status').read().split(key + ':')[1].split()[0])
def rss_kb():
    return status_kb('VmRSS')
path, mode = sys.argv[1], sys.argv[2]
ck = Checkpoint(path)
names = [ck.expert_name(L, e, f) for L in ck.moe_layers for e in range(ck.num_experts) for f in ('gate','up','down')]
before_peak = status_kb('VmHWM')  # peak RSS of this process image (ru_maxrss survives exec)
before = rss_kb()
t = time.time(); total = 0; checksum = 0.0
if mode == 'globe':
    for fam in ('gate', 'up', 'down'):
        for L, e, w in ck.iter_experts(fam):
            total += w.numel() * w.element_size(); checksum += float(w[0, 0])
else:
    from safetensors import safe_open
    handles = {}
    for n in names:
        f = ck.weight_map[n]
        h = handles.get(f) or handles.setdefault(f, safe_open(str(ck.dir / f), 'pt'))
        w = h.get_tensor(n); total += w.numel() * w.element_size(); checksum += float(w[0, 0])
peak = status_kb('VmHWM')
print(json.dumps({'rss_before_kb': before, 'peak_before_kb': before_peak, 'peak_kb': peak,
                  'bytes_read': total, 'seconds': time.time() - t, 'checksum': checksum}))
"""


def main() -> None:
    ap = Parser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reader_memory.json"))
    a = ap.parse_args()
    import torch

    from globe.io.checkpoint import Checkpoint
    from globe.testing.models import real_dim_model

    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        model = real_dim_model(num_layers=a.layers, dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        del model
        build_s = time.time() - t
        ck = Checkpoint(tmp)
        largest = max(
            __import__("math").prod(ck.shape(k)) * (2 if ck.dtype_str(k) in ("BF16", "F16") else 4)
            for k in ck.keys())
        expert_bytes = ck.p * ck.hidden_size * 2
        runs = {}
        for mode in ("globe", "safe_open_mmap"):
            r = subprocess.run([sys.executable, "-c", CHILD, tmp, mode], capture_output=True, text=True, check=True)
            runs[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        g = runs["globe"]
        growth = (g["peak_kb"] - max(g["rss_before_kb"], g["peak_before_kb"])) * 1024
        result = {
            "model": f"qwen2_moe real dims (d=2048, p=1408, 60 experts, shared 5632), {a.layers} layers, bf16",
            "bytes_on_disk": ck.bytes_on_disk(),
            "experts_read": 3 * len(ck.moe_layers) * ck.num_experts,
            "largest_tensor_bytes": largest,
            "expert_tensor_bytes": expert_bytes,
            "globe": runs["globe"],
            "baseline_safe_open_mmap": runs["safe_open_mmap"],
            "globe_peak_growth_bytes": growth,
            "globe_peak_growth_over_largest_tensor": round(growth / largest, 3),
            "target": "peak growth while reading < 2x largest tensor (interpreter overhead = rss before reading)",
            "target_met": growth < 2 * largest,
            "baseline_peak_growth_bytes": (runs["safe_open_mmap"]["peak_kb"]
                                           - runs["safe_open_mmap"]["rss_before_kb"]) * 1024,
            "build_seconds": round(build_s, 1),
            "machine": {"cpu_count": __import__("os").cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__},
        }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""`globe inspect`: what an MoE checkpoint holds, counted from tensor headers alone (no weights read).

JSON keys (DESIGN.md §4): model_type, moe_layers, num_experts, top_k, hidden_size,
expert_intermediate_size, shared_expert_intermediate_size, params{routed_up, routed_gate,
routed_down, shared, total}; extras: dense_layers, num_layers, layout, dtypes (stored dtype code ->
parameter count; FP8 scale tensors are not counted as parameters), quantization (null or a short
description), bytes_on_disk, path.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from .checkpoint import Checkpoint


def inspect(path: str, revision: str | None = None) -> dict[str, Any]:
    ck = Checkpoint(path, revision)
    E, p, d, L = ck.num_experts, ck.p, ck.hidden_size, len(ck.moe_layers)
    routed = L * E * p * d  # each of up, gate, down
    shared = sum(math.prod(ck.shape(n)) for n in ck.shared_tensor_names())
    numel = {k: math.prod(ck.shape(k)) for k in ck.keys()}
    dtypes = Counter()
    for k, n in numel.items():
        dtypes[ck.stored_dtype_str(k)] += n
    n_layers = int(ck.config["num_hidden_layers"])
    return {
        "model_type": ck.model_type,
        "moe_layers": list(ck.moe_layers),
        "num_experts": E,
        "top_k": ck.top_k,
        "hidden_size": d,
        "expert_intermediate_size": p,
        "shared_expert_intermediate_size": ck.shared_width,
        "params": {"routed_up": routed, "routed_gate": routed, "routed_down": routed,
                   "shared": shared, "total": sum(numel.values())},
        "num_layers": n_layers,
        "dense_layers": [i for i in range(n_layers) if i not in set(ck.moe_layers)],
        "layout": ck.layout,
        "quantization": ck.quantization,
        "dtypes": dict(dtypes),
        "bytes_on_disk": ck.bytes_on_disk(),
        "path": str(ck.dir),
    }


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_table(info: dict[str, Any]) -> str:
    p = info["params"]
    total = p["total"]
    rows = [
        ("model_type", info["model_type"]),
        ("path", info["path"]),
        ("layers", f"{info['num_layers']} ({len(info['moe_layers'])} MoE, {len(info['dense_layers'])} dense)"),
        ("MoE layers", _ranges(info["moe_layers"])),
        ("routed experts", f"{info['num_experts']} per layer, top-{info['top_k']}"),
        ("expert shape", f"p={info['expert_intermediate_size']} x d={info['hidden_size']}"),
        ("shared expert", f"width {info['shared_expert_intermediate_size']}"
                          if info["shared_expert_intermediate_size"] else "none"),
        ("layout", info["layout"]),
        ("dtype", ", ".join(f"{k} ({v / total:.0%})" for k, v in info["dtypes"].items())),
        ("quantization", info.get("quantization") or "none"),
        ("bytes on disk", f"{_fmt(info['bytes_on_disk'])}B"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append("")
    lines.append(f"{'params':<14}{'count':>12}{'share':>8}")
    for key in ("routed_up", "routed_gate", "routed_down", "shared"):
        lines.append(f"{key:<14}{_fmt(p[key]):>12}{p[key] / total:>8.1%}")
    other = total - sum(p[k] for k in ("routed_up", "routed_gate", "routed_down", "shared"))
    lines.append(f"{'other':<14}{_fmt(other):>12}{other / total:>8.1%}")
    lines.append(f"{'total':<14}{_fmt(total):>12}{1:>8.0%}")
    return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)

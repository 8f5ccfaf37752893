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
    """Summary of an MoE checkpoint, or of a globe export (format "globe", see `inspect_export`)."""
    from .checkpoint import resolve_path

    d = resolve_path(str(path), revision)
    if _is_export(d):
        return inspect_export(d)
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


def _is_export(d) -> bool:
    import json

    cfg = d / "config.json"
    try:
        return cfg.is_file() and "globe" in json.loads(cfg.read_text())
    except (ValueError, OSError):
        return False


def inspect_export(d) -> dict[str, Any]:
    """A globe export: the base model's MoE facts, the families (atoms, banks, rank, codes, stored
    parameters) and sizes, from config.json and the tensor headers alone."""
    import json

    from ..errors import GlobeError
    from .exportmeta import check_export_meta, family_shapes
    from .tensors import TensorDir

    conf = json.loads((d / "config.json").read_text())
    g = conf["globe"]
    if not isinstance(g, dict) or g.get("format") != "globe":
        fmt, ver = (g.get("format"), g.get("version")) if isinstance(g, dict) else (type(g).__name__, None)
        raise GlobeError(f"{d}: a globe export of format {fmt!r} version {ver}; "
                         "export it again from its fit directory with this globe")
    check_export_meta(g, str(d / "config.json"))
    src = TensorDir(d, g.get("weights_prefix", "model"))
    shapes = family_shapes(g)
    for k, shape in shapes.items():  # headers only: a missing or resized family tensor is damage
        if k not in src:
            raise GlobeError(f"{d}: export lacks tensor {k} (truncated or damaged: export it again)")
        if tuple(src.shape(k)) != shape:
            raise GlobeError(f"{d}: tensor {k} has shape {list(src.shape(k))}, its config.json says {list(shape)}")
    extra = sorted(k for k in src.keys() if (k.startswith("globe.") or ".kept_" in k) and k not in shapes)
    if extra:  # a family or kept-expert tensor config.json does not describe: the loaders refuse it too
        raise GlobeError(f"{d}: tensor {extra[0]} is not described by config.json's globe section "
                         f"({len(extra)} such; damaged or hand-edited export: export it again)")
    E, p, dd, L = int(g["num_experts"]), int(g["expert_intermediate_size"]), int(g["hidden_size"]), len(g["moe_layers"])
    fams = {}
    for f, fm in g["families"].items():
        m, r, G, K = int(fm["m"]), int(fm["r"]), int(fm.get("banks", 1)), len(fm.get("kept") or [])
        stored = G * (m * r * dd + 1) + L * E * p * r + int(fm["nnz"]) + (dd if fm.get("col_scale") else 0) + K * p * dd
        fams[f] = {"m": m, "r": r, "banks": G, "nnz": int(fm["nnz"]), "kept_experts": K, "stored_params": stored,
                   "original_params": L * E * p * dd, "stored_fraction": stored / (L * E * p * dd)}
    return {"format": "globe", "model_type": g.get("base_model_type"), "moe_layers": list(g["moe_layers"]),
            "num_experts": E, "top_k": conf.get("num_experts_per_tok"), "hidden_size": dd,
            "expert_intermediate_size": p, "families": fams, "dtype": g.get("dtype"),
            "save_mixed": g.get("save_mixed"), "cache": g.get("cache"),
            "params": {"total": sum(math.prod(src.shape(k)) for k in src.keys())},
            "bytes_on_disk": src.nbytes(), "original_bytes": g.get("original_bytes"), "source": g.get("source"),
            "path": str(d)}


def _bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_table(info: dict[str, Any]) -> str:
    if info.get("format") == "globe":
        return _export_table(info)
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
        ("bytes on disk", _bytes(info["bytes_on_disk"])),
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


def _export_table(info: dict[str, Any]) -> str:
    rows = [("format", f"globe export of a {info['model_type']} model ({info['dtype']})"), ("path", info["path"]),
            ("source", info.get("source") or "?"),
            ("MoE layers", f"{len(info['moe_layers'])} ({_ranges(info['moe_layers'])}), {info['num_experts']} experts"),
            ("expert shape", f"p={info['expert_intermediate_size']} x d={info['hidden_size']}"),
            ("bytes on disk", f"{_bytes(info['bytes_on_disk'])}" + (
                f" (source {_bytes(info['original_bytes'])}, {info['bytes_on_disk'] / info['original_bytes']:.1%})"
                if info.get("original_bytes") else "")),
            ("cache", str((info.get("cache") or {}).get("mode")))]
    kept = next(iter(info["families"].values()), {}).get("kept_experts", 0)
    if kept:
        rows.append(("kept experts", f"{kept} of {len(info['moe_layers']) * info['num_experts']} uncompressed "
                                     "(bank.keep_fraction; counted in 'stored')"))
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows] + ["", f"{'family':<8}{'m':>6}{'banks':>7}{'r':>7}{'codes':>9}"
                                                   f"{'stored':>10}{'of routed':>11}"]
    for f, fm in info["families"].items():
        lines.append(f"{f:<8}{fm['m']:>6}{fm['banks']:>7}{fm['r']:>7}{fm['nnz']:>9}{_fmt(fm['stored_params']):>10}"
                     f"{fm['stored_fraction']:>11.1%}")
    return "\n".join(lines)

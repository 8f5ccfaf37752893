"""The `globe` section of an export's config.json, checked before anything is built from it.

Why: `globe.load_model`, `globe eval/generate` and `globe inspect` read this section to size every
tensor; a hand-edited or truncated section (no `families`, a string where an object belongs, a
negative rank) would otherwise surface as a KeyError or a wrong allocation deep inside the loader.
No torch here: `globe inspect` reads headers only.

Keys (written by globe/runtime/export.py, see docs/format.md): format, version, dtype, moe_layers [int],
num_experts, hidden_size, expert_intermediate_size, families {up|gate: {m, r, nnz, activation, banks,
layer_bank [bank per MoE layer], col_scale, kept [global ids kept uncompressed]}}, save_mixed, cache,
base_model_type, experts_paths.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ..errors import GlobeError

FAMILIES = ("gate", "up")
_DTYPES = ("fp32", "bf16", "fp16")


def _int(v: Any, lo: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def kept_by_layer(kept: list[int], layers: list[int], E: int) -> dict[int, list[int]]:
    """{MoE layer: local ids (ascending) of its experts kept uncompressed} from global ids (layer-major,
    i = li * E + e) of a well-formed list (see kept_problem)."""
    out: dict[int, list[int]] = {}
    for i in kept:
        out.setdefault(int(layers[i // E]), []).append(i % E)
    return out


def kept_problem(lists: dict[str, Any], N: int) -> tuple[str, str, bool] | None:
    """(family, why, differs) for the first family whose `kept` list (global expert ids, bank.keep_fraction)
    is not distinct ascending integer ids in [0, N), fewer than N (differs False), or differs from the first
    family's (differs True: an expert is kept in every family or in none); None when all are well formed."""
    first = next(iter(lists), None)
    for f, k in lists.items():
        if not isinstance(k, list) or not all(_int(i, 0) and i < N for i in k) or k != sorted(set(k)) or len(k) >= N:
            return f, f"is {k!r:.80}, expected distinct ascending expert ids in [0, {N}), fewer than all", False
        if k != lists[first]:
            return f, f"differs from families.{first}.kept (an expert is kept in every family or in none)", True
    return None


def check_export_meta(meta: Any, where: str, activations: Collection[str] | None = None) -> dict[str, Any]:
    """Return `meta` when it is a well-formed globe section; GlobeError naming `where` and the key otherwise.

    Checks types and ranges only (a positive int where a size belongs, one family entry per fitted
    family with m, r, nnz and an activation name, one bank index per MoE layer); the tensors are checked
    against these sizes when they are read. activations: the known phi names (globe.maps.ACTIVATIONS; passed
    by the loader, since this module imports no torch); a family naming another is refused.
    """
    def bad(key: str, why: str) -> GlobeError:
        return GlobeError(f"{where}: globe.{key} {why}; the export is damaged or hand-edited: export it again")

    if not isinstance(meta, dict):
        raise GlobeError(f"{where}: the globe section must be an object, got {type(meta).__name__}")
    if meta.get("dtype") not in _DTYPES:
        raise bad("dtype", f"is {meta.get('dtype')!r}, expected one of {', '.join(_DTYPES)}")
    layers = meta.get("moe_layers")
    if not isinstance(layers, list) or not layers or not all(_int(x, 0) for x in layers) \
            or len(set(layers)) != len(layers):
        raise bad("moe_layers", f"is {layers!r}, expected a non-empty list of distinct layer indices")
    for k in ("num_experts", "hidden_size", "expert_intermediate_size"):
        if not _int(meta.get(k)):
            raise bad(k, f"is {meta.get(k)!r}, expected a positive integer")
    fams = meta.get("families")
    if not isinstance(fams, dict) or not fams:
        raise bad("families", f"is {fams!r}, expected an object with an entry per fitted family (up, gate)")
    E, p, d = meta["num_experts"], meta["expert_intermediate_size"], meta["hidden_size"]
    for f, fm in fams.items():
        if f not in FAMILIES:
            raise bad("families", f"names {f!r}; the families are {', '.join(FAMILIES)}")
        if not isinstance(fm, dict):
            raise bad(f"families.{f}", f"is {fm!r}, expected an object")
        for k in ("m", "r"):
            if not _int(fm.get(k)):
                raise bad(f"families.{f}.{k}", f"is {fm.get(k)!r}, expected a positive integer")
        if fm["r"] > min(p, d):
            raise bad(f"families.{f}.r", f"is {fm['r']}, above min(p, d) = {min(p, d)}")
        banks = fm.get("banks", 1)
        if not _int(banks):
            raise bad(f"families.{f}.banks", f"is {banks!r}, expected a positive integer")
        if not _int(fm.get("nnz"), 0) or fm["nnz"] > len(layers) * E * fm["m"]:
            raise bad(f"families.{f}.nnz", f"is {fm.get('nnz')!r}, expected an integer in [0, L*E*m]")
        if not isinstance(fm.get("activation"), str):
            raise bad(f"families.{f}.activation", f"is {fm.get('activation')!r}, expected an activation name")
        if activations is not None and fm["activation"] not in activations:
            raise bad(f"families.{f}.activation", f"is {fm['activation']!r}, expected one of {', '.join(activations)}")
        lb = fm.get("layer_bank", [0] * len(layers))
        if not isinstance(lb, list) or len(lb) != len(layers) or not all(_int(b, 0) and b < banks for b in lb):
            raise bad(f"families.{f}.layer_bank", f"is {lb!r}, expected one bank index in [0, {banks}) per MoE layer")
    problem = kept_problem({f: fm.get("kept") or [] for f, fm in fams.items()}, len(layers) * E)
    if problem:
        raise bad(f"families.{problem[0]}.kept", problem[1])
    kf = meta.get("keep_fp32", [])
    if not isinstance(kf, list) or not all(isinstance(x, str) for x in kf):
        raise bad("keep_fp32", f"is {kf!r}, expected a list of tensor names")
    if not isinstance(meta.get("cache", {}), dict):
        raise bad("cache", f"is {meta.get('cache')!r}, expected an object of cache settings")
    return meta


def family_shapes(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every family tensor a well-formed export holds (see docs/format.md), from a section
    check_export_meta accepted: bank (G, m, r, d), gain (G,), CSR codes, col_scale (d,), A_L (E, p, r) and,
    with save_mixed, mixed_L (E, r, d) per MoE layer; kept_f (K_L, p, d) beside each layer's experts that
    keeps some uncompressed."""
    E, p, d, layers = meta["num_experts"], meta["expert_intermediate_size"], meta["hidden_size"], meta["moe_layers"]
    out: dict[str, tuple[int, ...]] = {}
    for f, fm in meta["families"].items():
        G, m, r, nnz = fm.get("banks", 1), fm["m"], fm["r"], fm["nnz"]
        k = f"globe.{f}."
        out.update({k + "bank": (G, m, r, d), k + "gain": (G,), k + "indptr": (len(layers) * E + 1,),
                    k + "indices": (nnz,), k + "values": (nnz,)})
        if fm.get("col_scale"):
            out[k + "col_scale"] = (d,)
        for L in layers:
            out[f"{k}A_{L}"] = (E, p, r)
            if meta.get("save_mixed"):
                out[f"{k}mixed_{L}"] = (E, r, d)
    paths = meta.get("experts_paths") or {}
    kept = next((list(fm.get("kept") or []) for fm in meta["families"].values()), [])
    for L, ids in kept_by_layer(kept, layers, E).items():  # the source's gate/up beside the layer's Down
        if str(L) in paths:
            out.update({f"{paths[str(L)]}.kept_{f}": (len(ids), p, d) for f in meta["families"]})
    return out

"""Put GloBE modules into a transformers model: shared by patch_model, load_model and exported code.

Why one place: a patched in-memory model, a model rebuilt by `globe.load_model` and a globe export
opened by plain `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` must be the
same modules with the same tensor names. These functions depend only on torch and the runtime
classes (no registry, no config objects), so `globe/runtime/remote.py` copies their source, with the
runtime classes', into the `modeling_globe.py` it writes next to each export: one source of truth.

`meta` is the `globe` section of an export's config.json (see globe/artifacts.py): moe_layers,
num_experts, hidden_size, expert_intermediate_size, families {f: {m, r, banks, layer_bank, ...}},
save_mixed, and `experts_paths` {L: module path of that layer's experts, e.g. model.layers.3.mlp.experts}.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compat import experts_info
from ..io.exportmeta import kept_by_layer
from .experts import FAMILY_ORDER, GloBEExperts, GlobeStore
from .store import FamilyStore


def skeleton_store(meta: dict[str, Any], dtype: torch.dtype, device: torch.device | str | None = None) -> GlobeStore:
    """Family stores with the shapes `meta` describes, uninitialised (on meta inside a meta context)."""
    fams = {}
    for f, fm in meta["families"].items():
        fams[f] = FamilyStore(f, meta["moe_layers"], int(meta["num_experts"]), int(meta["expert_intermediate_size"]),
                              int(fm["r"]), int(meta["hidden_size"]), int(fm["m"]), int(fm.get("banks", 1)),
                              fm.get("layer_bank", [0] * len(meta["moe_layers"])), fm["activation"], int(fm["nnz"]),
                              bool(fm.get("col_scale")), mixed=bool(meta.get("save_mixed")), device=device,
                              dtype=dtype)
    return GlobeStore(fams)


def skeleton_dense(meta: dict[str, Any], dtype: torch.dtype,
                   device: torch.device | str | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Uninitialised (E, p, d) weights of the families that were not fitted, per MoE layer."""
    E, p, d = int(meta["num_experts"]), int(meta["expert_intermediate_size"]), int(meta["hidden_size"])
    return {int(L): {f: torch.empty(E, p, d, dtype=dtype, device=device) for f in FAMILY_ORDER
                     if f not in meta["families"]} for L in meta["moe_layers"]}


def kept_experts(meta: dict[str, Any]) -> dict[int, list[int]]:
    """{MoE layer: local ids (ascending) of its experts kept uncompressed} from the families' `kept` lists
    (global ids, layer-major; the same in every family: check_export_meta)."""
    ids = next((list(fm.get("kept") or []) for fm in meta["families"].values()), [])
    return kept_by_layer(ids, [int(L) for L in meta["moe_layers"]], int(meta["num_experts"]))


def skeleton_kept(meta: dict[str, Any], dtype: torch.dtype, device: torch.device | str | None = None
                  ) -> dict[int, tuple[list[int], dict[str, torch.Tensor]]]:
    """{MoE layer: (kept ids, {fitted family: uninitialised (K, p, d)})} for the layers that keep experts."""
    p, d = int(meta["expert_intermediate_size"]), int(meta["hidden_size"])
    return {L: (ids, {f: torch.empty(len(ids), p, d, dtype=dtype, device=device) for f in meta["families"]})
            for L, ids in kept_experts(meta).items()}


def swap_experts(model: nn.Module, store: GlobeStore, paths: dict[int, str], dense: dict[int, dict[str, torch.Tensor]],
                 mode: str = "full", S_per_layer: int = 16, compose_full: bool = False, collect_stats: bool = False,
                 build: bool = True, kept: dict[int, tuple[list[int], dict[str, torch.Tensor]]] | None = None
                 ) -> dict[int, nn.Module]:
    """Register `store` as model.globe and replace the experts module at each path by a GloBEExperts
    (Down is the original Parameter); kept[L]: that layer's experts kept uncompressed and their fitted
    families' weights (see skeleton_kept). Returns {layer: the replaced module}."""
    kept = kept or {}
    originals = {}
    for L, path in paths.items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        orig = getattr(parent, attr)
        new = GloBEExperts(experts_info(orig), orig.down_proj, store, int(L), dense.get(int(L), {}), mode=mode,
                           S_per_layer=int(S_per_layer), compose_full=compose_full, collect_stats=collect_stats,
                           build=build, kept=kept.get(int(L)))
        setattr(parent, attr, new)
        originals[int(L)] = orig
    model.add_module("globe", store)
    return originals

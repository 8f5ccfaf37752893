"""Swap the routed experts of every MoE layer for GloBEExperts, in place, and back.

Why in place: the router, shared expert, attention and KV cache of the transformers model keep
working unchanged; only `layers[L].<block>.experts` changes, and the fitted families are registered
once as `model.globe` (a GlobeStore whose buffers carry the format's names, `globe.{f}.bank`, ...).
The model's device and dtype are kept (compute dtype = cache.dtype, 'auto' follows the model); a
patched model follows `.to()`, `.half()`, `.float()` and device moves like any module.
`unpatch_model` puts the original modules back (the very same objects, so outputs are bit-identical);
with keep_original=False it rebuilds plain modules from the reconstructed weights instead.

State lives on the model as `model._globe` (a dict): originals, cache cfg, collect_stats.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import compat
from ..artifacts import Artifacts, Family, sparse_codes
from ..common import check_type, to_dtype
from ..config import CacheCfg
from ..errors import GlobeError
from .experts import FAMILY_ORDER, GloBEExperts, GlobeStore
from .skeleton import swap_experts
from .store import FamilyStore


def check_artifacts(model: nn.Module, arts: Artifacts) -> None:
    """One-line GlobeError when the artifacts were not fitted on this model's architecture and shapes."""
    mt = getattr(compat.text_config(model.config), "model_type", None)
    if arts.model_type != mt:
        raise GlobeError(f"artifacts are for model_type {arts.model_type!r}, the model is {mt!r}")
    layers = compat.moe_layer_ids(model)
    if list(arts.moe_layers) != layers:
        raise GlobeError(f"artifacts cover MoE layers {list(arts.moe_layers)} ({len(arts.moe_layers)}), "
                         f"the model has {layers} ({len(layers)})")
    info = compat.experts_info(compat.get_experts(model, layers[0]))
    if arts.num_experts != info.num_experts:
        raise GlobeError(f"artifacts have {arts.num_experts} experts per layer, the model has {info.num_experts}")
    if (arts.expert_intermediate_size, arts.hidden_size) != (info.p, info.d):
        raise GlobeError(f"artifact expert shape (p={arts.expert_intermediate_size}, d={arts.hidden_size}) does "
                         f"not match the model's (p={info.p}, d={info.d})")
    bad = [f for f in arts.families if f not in FAMILY_ORDER]
    if bad:
        raise GlobeError(f"artifacts contain unknown family {bad[0]!r} (expected gate and/or up)")
    arts.validate()


def compute_dtype(cache: CacheCfg, model_dtype: torch.dtype) -> torch.dtype:
    return to_dtype(cache.dtype, model_dtype)  # type: ignore[return-value]


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_globe", None) is not None


def cache_cfg(model: nn.Module) -> CacheCfg | None:
    """The cache settings a patched or loaded globe model runs with; None for any other model."""
    return (getattr(model, "_globe", None) or {}).get("cache")


def globe_layers(model: nn.Module) -> dict[int, GloBEExperts]:
    out = {}
    for L in compat.moe_layer_ids(model):
        mod = compat.get_experts(model, L)
        if isinstance(mod, GloBEExperts):
            out[L] = mod
    return out


def experts_paths(model: nn.Module) -> dict[int, str]:
    """{MoE layer: module path of its experts}, by the registry."""
    return {L: compat.experts_path(model, L) for L in compat.moe_layer_ids(model)}


def install(model: nn.Module, store: GlobeStore, dense: dict[int, dict[str, torch.Tensor]], cache: CacheCfg,
            collect_stats: bool = False, keep_original: bool = True, build: bool = True,
            paths: dict[int, str] | None = None, kept: dict | None = None) -> nn.Module:
    """Register `store` as model.globe and swap every MoE layer's experts for a GloBEExperts.

    dense[L]: weights (E, p, d) of the families that were not fitted; kept[L]: (ids, {family: (K, p, d)})
    of the experts kept uncompressed. build=False leaves the `full` tables empty (the loader fills the
    tensors first, then calls `build_caches`).
    """
    originals = swap_experts(model, store, paths or experts_paths(model), dense, cache.mode, int(cache.S_per_layer),
                             cache.compose_full, collect_stats, build=False, kept=kept)
    for f in FAMILY_ORDER:
        if f in store:  # one composition kernel per family for every mode and layer (cache.py)
            store[f].kernel = "compiled" if cache.compile else "eager"
    model._globe = {"originals": originals if keep_original else None, "cache": cache,
                    "collect_stats": collect_stats}
    compat.canonical_lm_head_input(model)  # inference weights do not require grad: see the function
    if build:
        build_caches(model)
    return model


def store_from_family(name: str, fam: Family, moe_layers: list[int], dtype: torch.dtype,
                      device: torch.device | str) -> FamilyStore:
    """A FamilyStore holding `fam`: bank and A cast to `dtype` (the compute dtype), codes as CSR fp32."""
    n, m, p, r, d = fam.shape
    st = FamilyStore(name, moe_layers, fam.num_experts, p, r, d, m, fam.n_banks, fam.layer_bank, fam.activation,
                     fam.nnz(), fam.col_scale is not None, device=device, dtype=dtype)
    indptr, indices, values = sparse_codes(fam.codes.cpu())
    st.bank = fam.bank.detach().to(device, dtype).contiguous()
    st.gain = fam.gain.detach().to(device, torch.float32)
    st.indptr, st.indices, st.values = indptr.to(device), indices.to(device), values.to(device)
    if fam.col_scale is not None:
        st.col_scale = fam.col_scale.detach().to(device, torch.float32)
    for li, L in enumerate(st.layers):
        setattr(st, f"A_{L}", fam.A_layer(li).detach().to(device, dtype).contiguous())
    return st


@torch.no_grad()
def dense_experts(mod: GloBEExperts) -> nn.Module:
    """A plain transformers experts module with the reconstructed fused gate/up weight (E, 2p, d)."""
    E = mod.num_experts
    w = {f: torch.stack([mod.weight(f, e) for e in range(E)]) for f in FAMILY_ORDER}  # (E, p, d) each
    return compat.plain_experts(mod.info, compat.fuse_gate_up(w["gate"], w["up"]), mod.down_proj)


def build_caches(model: nn.Module, progress: bool = False) -> None:
    """Compose the `full` tables of every layer, then release the banks (no longer read)."""
    layers = globe_layers(model)
    items = list(layers.values())
    if progress and any(m.mode == "full" for m in items):  # lru / none: nothing is composed ahead
        from ..progress import track
        items = track(items, "compose full cache", unit="layers")
    for mod in items:
        mod.build_cache()
    if layers and all(m.mode == "full" and m.table is not None for m in layers.values()) and \
            not any(m.store[f].has_mixed for m in layers.values() for f in m.fitted):
        for fam in model.globe.values():
            fam.release_bank()


def patch_model(model: nn.Module, artifacts: Artifacts | str | os.PathLike, cache: CacheCfg | None = None,
                collect_stats: bool = False, *, keep_original: bool = True,
                warmup_ids: torch.Tensor | None = None) -> nn.Module:
    """Swap the experts of every MoE layer for GloBEExperts built from `artifacts`, in place.

    cache: CacheCfg (mode full | lru | none, S_per_layer, dtype, warmup_tokens, compose_full); default full.
    collect_stats: count cache hits/misses (see `cache_stats`). keep_original: keep the replaced modules
    so `unpatch_model` restores them exactly (costs their memory). warmup_ids: (B, T) token ids for the
    LRU calibration pass (default: cache.warmup_tokens pseudo-random tokens, seed 0).
    Returns the same model object. Raises GlobeError on mismatched artifacts or a patched model.
    """
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise ValueError(f"model: expected a transformers MoE model (an nn.Module with a .config), got "
                         f"{type(model).__name__}")
    check_type(cache, CacheCfg, "cache")
    if is_patched(model):
        raise GlobeError("model is already patched with GloBE experts; call unpatch_model first")
    arts = artifacts if isinstance(artifacts, Artifacts) else Artifacts.load(artifacts)
    cache = cache or CacheCfg()
    check_artifacts(model, arts)
    layers = compat.moe_layer_ids(model)
    info = compat.experts_info(compat.get_experts(model, layers[0]))
    cd, dev = compute_dtype(cache, info.dtype), info.device
    store = GlobeStore({f: store_from_family(f, fa, layers, cd, dev) for f, fa in arts.families.items()})
    dense: dict[int, dict[str, torch.Tensor]] = {}
    kept: dict[int, tuple[list[int], dict[str, torch.Tensor]]] = {}
    for L in layers:
        gu = compat.gate_up_weight(compat.get_experts(model, L))
        dense[L] = {f: compat.family_rows(gu, f).clone() for f in FAMILY_ORDER if f not in store}
        ids = arts.kept_in_layer(L)  # kept uncompressed: the model's own rows (the source's weights)
        if ids:
            sel = torch.tensor(ids, device=gu.device)
            kept[L] = (ids, {f: compat.family_rows(gu, f).detach().index_select(0, sel) for f in store})
    install(model, store, dense, cache, collect_stats, keep_original, kept=kept)
    if cache.mode == "lru" and int(cache.warmup_tokens) > 0:
        warmup(model, warmup_ids, int(cache.warmup_tokens))
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore plain experts modules: the originals if kept, else dense ones rebuilt from W_hat."""
    state = getattr(model, "_globe", None)
    if state is None:
        raise GlobeError("model is not patched with GloBE experts")
    originals = state["originals"]
    for L, mod in globe_layers(model).items():
        compat.set_experts(model, L, originals[L] if originals is not None else dense_experts(mod))
    del model._modules["globe"]
    model._globe = None
    return model


def to_dense_model(model: nn.Module) -> nn.Module:
    """Replace every GloBEExperts by a plain experts module holding the reconstructed weights, in place."""
    for L, mod in globe_layers(model).items():
        compat.set_experts(model, L, dense_experts(mod))
    model._modules.pop("globe", None)
    model._globe = None
    return model


@torch.no_grad()
def warmup(model: nn.Module, ids: torch.Tensor | None = None, tokens: int = 2048, chunk: int = 512) -> None:
    """Calibration pass filling the LRU caches; stats are reset afterwards. Reports progress on big
    models (at full size on a CPU, 256 tokens take 20-40 s)."""
    from ..progress import Progress, is_big

    device = compat.model_device(model)
    if ids is None:  # pseudo-random ids drawn a chunk at a time (any `tokens` costs one chunk of memory)
        vocab = int(compat.text_config(model.config).vocab_size)
        g = torch.Generator().manual_seed(0)
        n = int(tokens)
        chunks = (torch.randint(0, vocab, (min(chunk, n - s),), generator=g) for s in range(0, n, chunk))
    else:
        ids = ids.reshape(-1)[:tokens]
        n = ids.numel()
        chunks = (ids[s:s + chunk] for s in range(0, n, chunk))
    with Progress(n, "lru warm-up", "tokens", quiet=not is_big(model)) as bar:
        for c in chunks:
            model(input_ids=c.unsqueeze(0).to(device), use_cache=False)
            bar.update(c.numel())
    reset_cache_stats(model)


def cache_stats(model: nn.Module) -> dict[str, Any]:
    """{'layers': {L: {hits, misses, cached}}, 'hits', 'misses', 'hit_rate'} (counts need collect_stats)."""
    out: dict[str, Any] = {"layers": {}}
    hits = misses = 0
    for L, mod in globe_layers(model).items():
        st = mod.cache_stats()
        out["layers"][L] = {**st, "cached": len(mod.cached_experts()), "bytes": mod.cache_nbytes()}
        hits, misses = hits + st["hits"], misses + st["misses"]
    out.update(hits=hits, misses=misses, hit_rate=hits / (hits + misses) if hits + misses else None)
    return out


def reset_cache_stats(model: nn.Module) -> None:
    for mod in globe_layers(model).values():
        mod.reset_stats()

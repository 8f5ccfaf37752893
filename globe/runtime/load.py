"""Load a model for inference in bounded memory: a globe export is rebuilt patched, tensor by tensor.

Why: the compressed prototype still holds 12-26 GB of weights depending on the cache mode. The
loader builds the transformers skeleton and the GloBE modules on the meta device (no memory), then
reads each tensor of the export's shards, casts it and assigns it in place, so the peak is the final
model plus one tensor; `full` tables are composed layer by layer afterwards. Before reading anything
it estimates the resident bytes of the requested cache mode and refuses (one line, with the figure
and a mode that would fit) when the machine does not have them, instead of being killed by the OS.
Any tensor the model needs that the files lack is refused by name: nothing is ever left randomly
initialised.

Resident bytes by mode (weights as loaded, dtype size s; per family R_f = r, or p with compose_full):
    base   every tensor of the export (non-expert, Down, A, banks, codes, kept experts' gate/up; kept
           experts run from these in place, nothing is copied for them)
    full   base + sum over MoE layers of (E - K_L) * R * d * s   (K_L kept experts in layer L have no
           block; the bank is freed once composed)
    lru    base + layers * min(S, E) * R * d * s
    none   base + a few blocks composed in flight (min(E, 8) * R * d * s)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .. import compat
from ..artifacts import FORMAT, VERSION
from ..common import DTYPES, check_type, count_non_finite, resolve_device, to_dtype
from ..config import CacheCfg, GlobeConfig
from ..errors import GlobeError
from ..io.checkpoint import resolve_path
from ..io.exportmeta import check_export_meta
from ..io.fitdir import check_version
from ..io.tensors import TensorDir
from ..maps import ACTIVATIONS
from ..progress import Progress, log
from .export import GLOBE_PREFIX, is_globe_dir
from .patch import build_caches, globe_layers, install, warmup
from .skeleton import kept_experts, skeleton_dense, skeleton_kept, skeleton_store

# Activations, KV cache, allocator slack on top of the weights (fraction). 0.12: at full size, scoring 2k
# tokens, the peak RSS measured up to 1.8% above a 0.08 estimate and up to 0.6% above a 0.10 one
# (lru S=8, none; benchmarks/results/fullsize_cpu.json); 0.12 keeps the estimate an upper bound.
OVERHEAD = 0.12
OVERHEAD_MIN = 0.5e9


def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, cache: CacheCfg | None = None,
               collect_stats: bool = False, check_memory: bool = True) -> nn.Module:
    """Load a model for inference: a GloBE export is rebuilt patched; any other directory loads plainly.

    device: default cpu. dtype: 'bf16'|'fp16'|'fp32'|torch.dtype, default as exported/stored.
    cache: overrides the cache settings saved at export (a save_mixed export always has every tilde_B).
    check_memory: refuse (GlobeError) when the estimated resident size exceeds the available memory.
    Raises GlobeError for a missing/corrupt/incomplete export or an unsupported format version.
    """
    check_type(cache, CacheCfg, "cache")
    p = resolve_path(str(path))
    dev = resolve_device(device or "cpu")
    if not is_globe_dir(p):
        from ..io.checkpoint import read_raw_config

        raw = read_raw_config(p)  # a missing or corrupt config.json: one line
        mt = raw.get("model_type")
        if isinstance(mt, str) and mt.startswith(GLOBE_PREFIX):  # transformers would prompt for remote code
            raise GlobeError(f"{p / 'config.json'}: model_type {mt!r} is a globe export's, but the file has no "
                             "globe section (damaged export)")
        if cache is not None:
            log("load: %s is not a globe export (its experts are dense); the cache settings do not apply", p)
        _check_moe_checkpoint(p, raw)
        return compat.load_pretrained(p, to_dtype(dtype), dev)
    conf = json.loads((p / "config.json").read_text())
    meta = conf.pop("globe")
    if not isinstance(meta, dict):
        raise GlobeError(f"{p / 'config.json'}: the globe section must be an object, got {type(meta).__name__}")
    check_version(meta, p / "config.json")
    check_export_meta(meta, str(p / "config.json"), ACTIVATIONS)
    dt = to_dtype(dtype, DTYPES[meta["dtype"]])
    if cache is None:
        saved = meta.get("cache", {})
        try:  # the config's own builder: an unknown key is named, not CacheCfg.__init__'s TypeError
            cache = GlobeConfig.from_dict({"cache": saved}).cache
        except (TypeError, ValueError) as e:  # a hand-edited export: name the file, one line
            raise GlobeError(f"{p / 'config.json'}: globe.cache {saved!r} is not valid: {e}") from None
    src = TensorDir(p, meta.get("weights_prefix", "model"))
    if check_memory:
        check_memory_for(meta, src, cache, dt, dev)
    base = meta.get("base_model_type") or conf["model_type"].removeprefix(GLOBE_PREFIX)
    conf["model_type"] = base
    config = compat.config_from_dict(conf, str(p / "config.json"))
    model = compat.empty_model(config, dt)
    store = skeleton_store(meta, dt, "meta")
    dense = skeleton_dense(meta, dt, "meta")
    kept = skeleton_kept(meta, dt, "meta")
    if compat.moe_layer_ids(model) != list(meta["moe_layers"]):
        raise GlobeError(f"{p}: config.json MoE layers {compat.moe_layer_ids(model)} differ from the globe "
                         f"section's {meta['moe_layers']}")
    install(model, store, dense, replace(cache, warmup_tokens=0), collect_stats, keep_original=False, build=False,
            kept=kept)
    assign_all(model, src, dev, str(p))
    build_caches(model, progress=len(meta["moe_layers"]) > 4)
    model._globe["cache"] = cache
    if cache.mode == "lru" and int(cache.warmup_tokens) > 0:
        warmup(model, None, int(cache.warmup_tokens))
    return model.eval()


def _check_moe_checkpoint(p, raw: dict) -> None:
    """An MoE of a registry architecture: its expert tensors checked against config.json from the headers
    (Checkpoint), so a wrong num_experts or width is one line, not transformers' mismatch report."""
    from ..io.checkpoint import Checkpoint
    from ..registry import REGISTRY

    if raw.get("model_type") in REGISTRY and not raw.get("quantization_config"):  # quantized: transformers' job
        Checkpoint(p)


def assign_all(model: nn.Module, src: TensorDir, device: torch.device, where: str) -> None:
    """Read every tensor of `src`, cast it to its slot's dtype and assign it (peak: one tensor extra)."""
    slots = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    keys = src.keys()
    unknown = [k for k in keys if k not in slots]
    if unknown:
        raise GlobeError(f"{where}: tensor {unknown[0]} does not belong to this model ({len(unknown)} unexpected)")
    total = sum(math.prod(src.shape(k)) for k in keys)
    with Progress(total, "load", unit="params", scale=1e-9, unit_name="G params",
                  quiet=total < 2e9) as bar:
        for k in keys:
            slot = slots[k]
            t = src.tensor(k)
            if tuple(t.shape) != tuple(slot.shape):
                raise GlobeError(f"{where}: tensor {k} has shape {list(t.shape)}, the model expects {list(slot.shape)}")
            t = t.to(device=device, dtype=slot.dtype if slot.is_floating_point() else t.dtype)
            bad = count_non_finite(t)  # after the cast: an fp32 value beyond fp16's range is inf too
            if bad:
                raise GlobeError(f"{where}: tensor {k} holds {bad} NaN/inf value(s) in {t.dtype}: the export is "
                                 "damaged (or its values exceed the dtype asked for)")
            _set(model, k, t)
            bar.update(t.numel())
    cfg = compat.text_config(model.config)
    if getattr(cfg, "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise GlobeError(f"{where}: missing tensor {left[0]} ({len(left)} missing): files truncated or incomplete; "
                         "refusing to leave it randomly initialised")
    for n, b in list(model.named_buffers()):  # real buffers of the skeleton (rotary inv_freq) follow the device
        if b.device != device:
            _set(model, n, b.to(device))


def _set(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = t
    else:
        raise GlobeError(f"tensor {name}: no such parameter or buffer")


# ---- memory ------------------------------------------------------------------------------------------
def estimate_bytes(meta: dict[str, Any], src: TensorDir, cache: CacheCfg, dtype: torch.dtype) -> dict[str, Any]:
    """Estimated resident bytes of the loaded model per cache mode (see the module docstring)."""
    s = torch.empty(0, dtype=dtype).element_size()
    keep = set(meta.get("keep_fp32", ()))
    base = 0
    for k in src.keys():
        n = math.prod(src.shape(k))
        dt = src.dtype(k)
        part = k.rsplit(".", 1)[-1]
        base += n * (dt.itemsize if (not dt.is_floating_point or part in keep) else s)
    L, E, d, p = len(meta["moe_layers"]), int(meta["num_experts"]), int(meta["hidden_size"]), \
        int(meta["expert_intermediate_size"])
    R = sum(p if cache.compose_full else int(fm["r"]) for fm in meta["families"].values())
    bank = sum(int(fm.get("banks", 1)) * int(fm["m"]) * int(fm["r"]) * d * s for fm in meta["families"].values())
    blk = R * d * s  # one composed block
    K = sum(len(ids) for ids in kept_experts(meta).values())  # kept uncompressed: no block in a `full` table
    modes = {"full": base + (L * E - K) * blk, "lru": base + L * min(int(cache.S_per_layer), E) * blk,
             "none": base + min(E, 8) * blk}
    return {"base": base, "bank": bank, "block": blk, "modes": modes}


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory_for(meta: dict[str, Any], src: TensorDir, cache: CacheCfg, dtype: torch.dtype,
                     device: torch.device) -> None:
    """One-line GlobeError when the requested cache mode will not fit the available memory."""
    if device.type == "meta":
        return
    est = estimate_bytes(meta, src, cache, dtype)
    need = _with_overhead(est["modes"][cache.mode])
    avail = available_bytes(device)
    if need <= avail:
        log("load: about %.1f GB resident with cache.mode=%s (%.1f GB available)", need / 1e9, cache.mode, avail / 1e9)
        return
    raise GlobeError(f"loading {src.dir} with cache.mode={cache.mode}"
                     f"{f' cache.S_per_layer={cache.S_per_layer}' if cache.mode == 'lru' else ''} needs about "
                     f"{need / 1e9:.1f} GB, only {avail / 1e9:.1f} GB available on {device.type}"
                     f"{_fitting_hint(est, meta, avail)}")


def _with_overhead(n: float) -> float:
    return n + max(OVERHEAD * n, OVERHEAD_MIN)


HINT_ROOM = 0.95  # a suggested setting leaves 5% of the available memory to everything else


def _fitting_hint(est: dict[str, Any], meta: dict[str, Any], avail: int) -> str:
    """'; cache.mode=lru cache.S_per_layer=S needs about X GB' for the largest S (a multiple of 4 from 8
    on) that fits in HINT_ROOM of the available memory, else `none`'s figure, else a way out."""
    L, E = len(meta["moe_layers"]), int(meta["num_experts"])
    base, per_block = est["base"], est["block"]
    for S in range(E, 1, -1):
        need = _with_overhead(base + L * S * per_block)
        if need <= HINT_ROOM * avail and (S < 8 or S % 4 == 0):
            return f"; cache.mode=lru cache.S_per_layer={S} needs about {need / 1e9:.1f} GB"
    need = _with_overhead(est["modes"]["none"])
    if need <= avail:
        return f"; cache.mode=none needs about {need / 1e9:.1f} GB"
    return "; no cache mode fits: use a machine with more memory, or dtype=bf16"


__all__ = ["FORMAT", "VERSION", "estimate_bytes", "globe_layers", "load_model"]

"""`globe eval`: perplexity, speed, memory, cache hit rate and zero-shot of one model directory.

Why one entry point: the CLI composes a GlobeConfig and calls `run_eval(cfg)`; the demo and the
benchmarks call the same function, so every number in the docs comes from one code path.

`cfg.model.path` may be an original HF checkpoint, a dense export (plain transformers directory) or a
GloBE export (told apart by `globe.runtime.export.export_kind`, loaded with `load_model`, which applies
cfg.cache). The returned object always has the keys
    perplexity, nll_per_token, tokens, prefill_tok_s, decode_tok_s, peak_mem_bytes, cache_hit_rate,
    device, dtype
(null where not asked) plus extras: model_path, model_kind, cache (globe models: mode, S_per_layer), context,
stride, windows, speed details, hit_rate_by_S, zero_shot, seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..artifacts import atomic_write
from ..common import dtype_name, resolve_device, resolve_dtype
from ..config import CacheCfg, GlobeConfig
from ..errors import GlobeError
from ..progress import log

KEYS = ("perplexity", "nll_per_token", "tokens", "prefill_tok_s", "decode_tok_s", "peak_mem_bytes",
        "cache_hit_rate", "device", "dtype")


def load_for_eval(cfg: GlobeConfig, device: torch.device, dtype: torch.dtype, collect_stats: bool = False):
    """(model, tokenizer, kind) for cfg.model.path; kind is 'globe', 'dense' (a globe dense export) or 'hf'."""
    from .. import compat
    from ..artifacts import Artifacts
    from ..io.checkpoint import resolve_path
    from ..runtime.export import export_kind
    from ..runtime.load import load_model

    path = resolve_path(cfg.model.path, cfg.model.revision)
    tok = compat.load_tokenizer(path)
    kind = export_kind(path)
    if kind == "globe" and cfg.artifacts:
        raise GlobeError(f"artifacts: {path} is already a globe export; give the original checkpoint as "
                         "model.path to apply a fit directory, or drop artifacts=")
    if kind is None and not (path / "config.json").is_file():
        raise GlobeError(f"no config.json in {path}: not a model directory")
    # cache settings: a globe export applies them; with artifacts= they go to patch_model below; on any other
    # model load_model says they do not apply
    model = load_model(str(path), device=device, dtype=dtype, cache=None if cfg.artifacts else cfg.cache,
                       collect_stats=collect_stats)
    kind = kind or "hf"
    if cfg.artifacts:  # an original checkpoint with a fit directory: patched in place, as globe.patch_model
        from ..runtime.patch import patch_model

        patch_model(model, Artifacts.load(cfg.artifacts), cache=cfg.cache or CacheCfg(),
                    collect_stats=collect_stats, keep_original=False)
        kind = "globe"
    return model.eval(), tok, kind


def _cache_S(model, cfg: GlobeConfig) -> int:
    """The LRU capacity this eval reports a hit rate for: the command line's, else the loaded model's."""
    from ..runtime.patch import cache_cfg

    if cfg.cache is not None:
        return int(cfg.cache.S_per_layer)
    return int(getattr(cache_cfg(model), "S_per_layer", CacheCfg.S_per_layer))


def _runtime_stats(model) -> dict[str, Any] | None:
    """Counted hits/misses of the runtime's LRU caches (GloBE model loaded with collect_stats), else None."""
    from ..runtime.patch import cache_stats, is_patched

    if not is_patched(model):
        return None

    st = cache_stats(model) or {}
    if not st.get("hits") and not st.get("misses"):
        return None
    return {"hits": int(st["hits"]), "misses": int(st["misses"]), "hit_rate": st.get("hit_rate")}


def _text(cfg: GlobeConfig) -> str | None:
    from .perplexity import load_dataset_text, load_text

    if cfg.eval.text:
        return load_text(cfg.eval.text)
    if cfg.eval.dataset:
        return load_dataset_text(cfg.eval.dataset)
    return None


def run_eval(cfg: GlobeConfig) -> dict[str, Any]:
    """Evaluate cfg.model.path as cfg.eval asks; return (and write to cfg.output, atomically) one dict."""
    threads = torch.get_num_threads()
    if cfg.eval.threads:
        torch.set_num_threads(int(cfg.eval.threads))
    try:
        out = _run_eval(cfg)
    finally:
        torch.set_num_threads(threads)
    return out


def _run_eval(cfg: GlobeConfig) -> dict[str, Any]:
    from .hit_rate import hit_rate_curve, record_routing
    from .perplexity import max_positions, perplexity, tokenize
    from .speed import RssSampler, measure_speed

    ev = cfg.eval
    mp = Path(cfg.model.path).expanduser()
    if mp.is_dir() and not (mp / "config.json").is_file():  # e.g. a fit directory given as the model
        hint = (f"; {mp} is a fit directory: give the original as model.path and artifacts={mp}, or export it"
                if (mp / "globe_config.json").is_file() else "")
        raise GlobeError(f"no config.json in {mp}: not a model directory{hint}")
    if not (ev.text or ev.dataset or ev.speed or ev.hit_rate or ev.tasks):
        raise GlobeError("nothing to evaluate: give eval.text=FILE, eval.dataset=wikitext2, eval.speed=true "
                         "or eval.tasks=[...]")
    if cfg.output:
        from ..io.outputs import check_file_writable

        check_file_writable(cfg.output, what="output")  # missing dir, read-only, a directory in the way
    text = _text(cfg)  # bad text/dataset/tasks fail before the model loads
    manager = None
    if ev.tasks:
        from .zeroshot import validate_tasks

        manager = validate_tasks(ev.tasks, ev.task_paths)
    elif ev.task_paths:  # read only with eval.tasks; a wrong path is still an error, as documented
        from .zeroshot import task_dirs

        task_dirs(ev.task_paths)
        log("note: eval.task_paths is read only with eval.tasks=[...]; no zero-shot task runs")
    if ev.hit_rate and text is None:
        raise GlobeError("eval.hit_rate needs text to route: give eval.text=FILE or eval.dataset=wikitext2")
    torch.manual_seed(0)
    device = resolve_device(ev.device, "eval.device")
    dtype = resolve_dtype(ev.dtype, device)
    t0 = time.perf_counter()
    model, tok, kind = load_for_eval(cfg, device, dtype, collect_stats=bool(ev.hit_rate))
    out: dict[str, Any] = dict.fromkeys(KEYS)
    out.update(device=device.type, dtype=dtype_name(dtype), model_path=str(cfg.model.path), model_kind=kind,
               threads=torch.get_num_threads(), load_s=time.perf_counter() - t0)
    from ..runtime.patch import cache_cfg, globe_layers

    cache = cache_cfg(model)  # the cache settings a globe model runs with
    out["cache"] = None
    if cache is not None:  # S only means something in lru mode; S above the expert count holds every expert
        E = max((m.num_experts for m in globe_layers(model).values()), default=int(cache.S_per_layer))
        out["cache"] = {"mode": cache.mode,
                        "S_per_layer": min(int(cache.S_per_layer), E) if cache.mode == "lru" else None,
                        "compile": bool(cache.compile)}
    ids = tokenize(tok, text, ev.max_tokens) if text is not None else None
    if ids is not None:
        if device.type == "cpu":
            with RssSampler() as rss:
                ppl = perplexity(model, ids, ev.context, ev.stride, device)
            out["peak_mem_bytes"], out["peak_mem_kind"] = int(rss.peak), "cpu_peak_rss"
        else:
            ppl = perplexity(model, ids, ev.context, ev.stride, device)
        out.update({k: ppl[k] for k in ("perplexity", "nll_per_token", "tokens", "context", "stride", "windows")})
    if ev.speed:
        n_pre, limit = int(ev.prefill_tokens), max_positions(model)
        if limit is not None and int(ev.decode_tokens) >= limit:
            raise GlobeError(f"eval.decode_tokens={ev.decode_tokens} leaves no room for a prompt in the model's "
                             f"{limit} positions (max_position_embeddings); use fewer")
        if limit is not None and n_pre + int(ev.decode_tokens) > limit:  # fit the model's window, say so
            n_pre = limit - int(ev.decode_tokens)
            out["prefill_tokens_clamped_from"] = int(ev.prefill_tokens)
        sp = measure_speed(model, n_pre, ev.decode_tokens)
        out.update({k: v for k, v in sp.items() if k != "device"})
    if ev.hit_rate:
        S_now = _cache_S(model, cfg)
        S_values = sorted({*map(int, ev.S_values), S_now})
        curve = hit_rate_curve(record_routing(model, ids, ev.context), S_values, warmup=0)
        out["hit_rate_by_S"] = dict(zip(map(str, curve["S"]), curve["hit_rate"]))
        out["hit_rate_per_layer"] = curve["per_layer"]
        out["cache_hit_rate"] = out["hit_rate_by_S"][str(S_now)]
        out["cache_hit_rate_kind"] = f"simulated_lru_S{S_now}"
    measured = _runtime_stats(model)
    if measured is not None:
        out["runtime_cache_stats"] = measured  # the real caches, over every forward of this eval
    if ev.tasks:
        from .zeroshot import zero_shot

        out["zero_shot"] = zero_shot(model, tok, ev.tasks, batch_size=ev.task_batch_size, limit=ev.task_limit,
                                     manager=manager)
    if out["cache"] is not None and out["cache"]["compile"]:  # whether the fused kernel really composed
        from ..runtime.cache import fused_available

        out["cache"]["compile"] = fused_available()
    out["seconds"] = time.perf_counter() - t0
    if cfg.output:
        dest = Path(cfg.output).expanduser()
        atomic_write(dest, lambda p: Path(p).write_text(json.dumps(out, indent=2) + "\n"))
    return out

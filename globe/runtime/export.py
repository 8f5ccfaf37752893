"""Export straight from the source shards and the fit artifacts, tensor by tensor: no model is built.

Why model-free: the prototype is 28.6 GB in bf16, more than a 24 GB machine holds. Both formats are
planned from the source's tensor headers and the artifacts' metadata, then written by the streaming
`ShardedWriter` (<= 5 GB shards + index.json, Hugging Face conventions) while each tensor is read,
cast or reconstructed: peak memory is about one MoE layer (the largest: a fused (E, 2p, d) W_hat).

format=dense: the source checkpoint with the routed experts' gate/up tensors replaced by W_hat
(fp32 from the artifacts, cast to export.dtype; experts kept uncompressed keep the source's
weights), under the source's own on-disk names and layout
(per-expert or fused), so plain `AutoModelForCausalLM.from_pretrained` and vLLM load it.

format=globe: the family tensors of the artifacts (see globe/artifacts.py, bank and A cast to
export.dtype; `export.save_mixed` adds each expert's tilde_B) plus every tensor GloBE leaves
untouched, under the names the patched model holds in memory:
    <name>                                    every non-expert tensor (transformers' in-memory names)
    {layers}.{L}.{block}.experts.down_proj    (E, d, p)  Down, dense
    {layers}.{L}.{block}.experts.W_{f}        (E, p, d)  a family that was not fitted
    {layers}.{L}.{block}.experts.kept_{f}     (K_L, p, d) the layer's experts kept uncompressed (bank.keep_fraction)
    globe.{f}.*                               the fitted families
config.json is the source config with `model_type` "globe_<base>", `auto_map` entries and a `globe`
section (the artifacts' metadata plus dtype, save_mixed, cache, base_model_type, experts_paths).
`globe.load_model(OUT)` rebuilds it; `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`
does too without globe, through the generated `modeling_globe.py` (globe/runtime/remote.py); without
trust_remote_code plain transformers refuses the unknown model_type instead of filling experts with
random weights. README.md is a model card (source, budget, fit errors, how to load).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import compat
from ..artifacts import KEEP_FP32, Artifacts, Family
from ..common import DTYPES, check_type, count_non_finite
from ..config import CacheCfg, ExportCfg, GlobeConfig
from ..errors import GlobeError
from ..io.checkpoint import Checkpoint
from ..io.outputs import check_writable, staging_dir
from ..io.writer import ShardedWriter
from ..progress import Progress, log
from .cache import BankCodes, compose_many
from .experts import FAMILY_ORDER
from .remote import auto_map, fit_summary, write_remote_files

GLOBE_PREFIX = "globe_"  # model_type of a globe export: globe_<base model_type>
COPY_PATTERNS = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "*.model", "*.tiktoken",
                 "added_tokens.json", "chat_template*", "generation_config.json")

Plan = list[tuple[str, torch.dtype, tuple[int, ...]]]
Producer = Callable[[], Iterator[tuple[str, torch.Tensor]]]


def export_kind(path: Any) -> str | None:
    """'globe' when `path` holds a globe export (config.json with a `globe` section), 'dense' for a dense
    export (DENSE_KEY), None otherwise (an original checkpoint, anything unreadable)."""
    try:
        conf = json.loads((Path(path) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(conf, dict):
        return None
    return "globe" if "globe" in conf else "dense" if DENSE_KEY in conf else None


def is_globe_dir(path: Any) -> bool:
    """True when `path` holds a GloBE export (config.json with a `globe` section)."""
    return export_kind(path) == "globe"


# ---- export ------------------------------------------------------------------------------------------
def export(model: str | os.PathLike, artifacts: str | os.PathLike | Sequence[str | os.PathLike],
           output_dir: str | os.PathLike, config: ExportCfg | None = None, *, cache: CacheCfg | None = None,
           revision: str | None = None) -> Path:
    """Write `output_dir` from the source checkpoint `model` (a directory or hub id) and the fit directory
    (or list of fit directories) `artifacts`, as `config` asks (format globe|dense, dtype, save_mixed,
    max_shard_gb). Model-free: tensors are streamed shard to shard, never a whole model in memory.

    cache: the cache settings a `globe` export records as its default (load_model may override them).
    Raises GlobeError when the inputs disagree, a non-expert tensor is missing, the output is not writable
    or the disk is too small; nothing half-written is left at `output_dir`. Returns output_dir."""
    ecfg = check_type(config, ExportCfg, "config") or ExportCfg()
    check_type(cache, CacheCfg, "cache")
    out = _check_out(output_dir, ecfg.overwrite)
    if not artifacts:
        raise GlobeError("artifacts: give the fit output directory (artifacts=DIR)")
    paths = artifacts if isinstance(artifacts, (list, tuple)) else [artifacts]
    if not all(isinstance(a, (str, os.PathLike)) for a in paths):
        raise ValueError(f"artifacts: expected a fit directory (a path) or a list of them, got {artifacts!r:.80}")
    src = ", ".join(map(str, artifacts)) if isinstance(artifacts, (list, tuple)) else str(artifacts)
    log("export %s: reading the headers of %s and %s", ecfg.format, model, src)
    ck = Checkpoint(str(model), revision)
    arts = Artifacts.load(artifacts)
    if ecfg.format == "globe":
        fit_summary(artifacts)  # a damaged summary.json (the model card's figures) fails here, not at the end
    check_ckpt(ck, arts)  # model-free, before any weight is read
    check_complete(ck)
    dtype = DTYPES[ecfg.dtype]
    if ecfg.format == "dense":
        plan, produce = dense_plan(ck, arts, dtype)
    else:
        plan, produce = globe_plan(ck, arts, dtype, ecfg.save_mixed)
    total = sum(math.prod(s) * torch.empty(0, dtype=dt).element_size() for _, dt, s in plan)
    check_writable(out, need_bytes=total, what="output_dir")
    max_shard = int(float(ecfg.max_shard_gb) * 1e9)
    log("export %s: %s + %s -> %s (%.2f GB of weights in %s)", ecfg.format, ck.dir, src, out, total / 1e9, ecfg.dtype)
    with staging_dir(out, replace=ecfg.overwrite) as tmp:
        with ShardedWriter(tmp, plan, prefix="model", max_shard_bytes=max_shard) as w, \
                Progress(total, f"export {ecfg.format}", unit="GB", scale=1e-9) as bar:
            for name, t in produce():
                check_finite(name, t, ecfg.dtype)
                w.write(name, t)
                bar.update(t.numel() * t.element_size())
            w.close()
        if ecfg.format == "dense":  # plain transformers config, plus where the weights came from
            conf = {**_dense_config(ck, ecfg), DENSE_KEY: {"source": str(ck.dir), "artifacts": src}}
        else:
            conf = _globe_config(ck, arts, ecfg, cache or CacheCfg(), src, total)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        if ecfg.format == "globe":
            write_remote_files(tmp, conf, [str(a) for a in artifacts] if isinstance(artifacts, (list, tuple))
                               else str(artifacts))
        _copy_side_files(ck.dir, tmp)
    written = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))  # files against files, headers in
    log("exported %s model to %s: %.2f GB of weights in %s, %.2f GB of safetensors files against the source's "
        "%.2f GB: ratio %.3f", ecfg.format, out, total / 1e9, ecfg.dtype, written / 1e9, ck.bytes_on_disk() / 1e9,
        written / max(1, ck.bytes_on_disk()))
    return out


def run_export(cfg: GlobeConfig) -> Path:
    """`globe export`: the combined config unpacked into `export` (model.path, artifacts, output_dir, export,
    and cache when the command line set it)."""
    return export(cfg.model.path, cfg.artifacts, cfg.output_dir, cfg.export, cache=cfg.cache,
                  revision=cfg.model.revision)


def _check_out(output_dir: str | None, overwrite: bool = False) -> Path:
    if not output_dir:
        raise GlobeError("output_dir: required (where to write the exported model)")
    out = Path(output_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise GlobeError(f"output_dir {out} exists and is not empty; choose a new directory "
                             "(or export.overwrite=true to replace an earlier export)")
        if export_kind(out) is None:
            raise GlobeError(f"output_dir {out} is not an earlier globe or dense export; export.overwrite only "
                             "replaces those")
        log("export: export.overwrite=true: the whole directory %s (an earlier export, %d files) is replaced "
            "when the new export is complete", out, sum(1 for f in out.rglob("*") if f.is_file()))
    check_writable(out, what="output_dir")
    return out


def check_ckpt(ck: Checkpoint, arts: Artifacts) -> None:
    """The artifacts were fitted on this checkpoint's architecture and shapes (one line otherwise)."""
    got = (ck.model_type, list(ck.moe_layers), ck.num_experts, ck.hidden_size, ck.p)
    want = (arts.model_type, list(arts.moe_layers), arts.num_experts, arts.hidden_size, arts.expert_intermediate_size)
    names = ("model_type", "MoE layers", "experts per layer", "hidden size", "expert width")
    for n, g, w in zip(names, got, want):
        if g != w:
            raise GlobeError(f"artifacts do not match the model: {n} {w} in the artifacts, {g} in {ck.dir}")
    for f, digest in sorted(arts.source_digest.items()):
        if f in arts.families and ck.expert_digest(f) != digest:
            log("warning: the %s experts of %s differ from those the artifacts were fitted on (%s): the "
                "export combines this model with another model's fit", f, ck.dir, arts.source or "unknown source")


def model_names(ck: Checkpoint) -> tuple[set[str], bool]:
    """(state_dict names of the transformers model this config builds, tie_word_embeddings); no weights."""
    config = compat.load_config(ck.dir)
    model = compat.empty_model(config, torch.float32)
    tied = bool(getattr(compat.text_config(config), "tie_word_embeddings", False))
    return set(model.state_dict()), tied


def covered_names(ck: Checkpoint) -> dict[str, str]:
    """{in-memory name: on-disk name} of every non-expert tensor on disk (experts are fused, see compat)."""
    experts = ck.expert_tensor_names()
    return {compat.memory_name(ck.spec, k): k for k in ck.keys() if k not in experts}


def check_complete(ck: Checkpoint) -> None:
    """Refuse a checkpoint that lacks a tensor the model needs: an export or load must never fill one
    with a fresh random initialisation."""
    names, tied = model_names(ck)
    have = set(covered_names(ck))
    for L in ck.moe_layers:
        fp = compat.experts_prefix(ck.spec, L)
        have |= {f"{fp}.{compat.GATE_UP}", f"{fp}.{compat.DOWN}"}
    missing = sorted(n for n in names - have if not (tied and n.endswith("lm_head.weight")))
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GlobeError(f"{ck.dir}: checkpoint lacks tensor {missing[0]}{more}, which the model needs; "
                         "refusing to fill it with a random initialisation")


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _layer_of(name: str, ck: Checkpoint) -> int:
    m = re.match(rf"^{re.escape(ck.spec.layers_prefix)}\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _ordered_keys(ck: Checkpoint, keys: list[str]) -> list[str]:
    """Non-layer tensors first, then layer by layer (so a layer's artifacts are loaded once)."""
    return sorted(keys, key=lambda k: (_layer_of(k, ck), k))


def _float_dtype(ck: Checkpoint, name: str, dtype: torch.dtype) -> torch.dtype:
    from ..io.stfile import DTYPES

    dt = DTYPES.get(ck.dtype_str(name), (torch.float32, 4))[0]
    return dtype if dt.is_floating_point else dt


class _LayerRecon:
    """W_hat (E, p, d) in the export dtype of every fitted family of one MoE layer, computed once per layer
    (Family.reconstruct in fp32, then cast). The source's per-expert names interleave the families
    (experts.0.gate_proj, experts.0.up_proj, experts.1.gate_proj, ...), so all families of the current layer
    are held together: 2 x E x p x d numbers in dtype (0.7 GB in bf16 at Qwen1.5-MoE-A2.7B's size)."""

    def __init__(self, arts: Artifacts, dtype: torch.dtype, ck: Checkpoint):
        self.arts, self.dtype, self.ck, self.layer, self.val = arts, dtype, ck, None, {}

    def get(self, f: str, L: int) -> torch.Tensor:
        if self.layer != L:
            sl = self.arts.layer_slice(L)
            self.val = {}
            for g, fam in self.arts.families.items():
                self.val[g] = fam.reconstruct(torch.arange(sl.start, sl.stop)).to(self.dtype)
                for e in self.arts.kept_in_layer(L):  # kept uncompressed: the source's own weights
                    self.val[g][e] = self.ck.expert(L, e, g, self.dtype)
            self.layer = L
        return self.val[f]


def dense_plan(ck: Checkpoint, arts: Artifacts, dtype: torch.dtype) -> tuple[Plan, Producer]:
    """The source's tensors under its own names; fitted gate/up experts replaced by W_hat."""
    fam_of = {}  # on-disk name -> (family, layer, expert or None for fused)
    fused_gu = {}
    for L in ck.moe_layers:
        for f in arts.families:
            if ck.layout == "per_expert":
                for e in range(ck.num_experts):
                    fam_of[ck.expert_name(L, e, f)] = (f, L, e)
        if ck.layout == "fused":
            fused_gu[f"{ck._fused_prefix(L)}.{compat.GATE_UP}"] = L
    keys = _ordered_keys(ck, ck.keys())
    plan = [(k, _float_dtype(ck, k, dtype), tuple(ck.shape(k))) for k in keys]

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        rec = _LayerRecon(arts, dtype, ck)
        for k in keys:
            if k in fam_of:
                f, L, e = fam_of[k]
                yield k, rec.get(f, L)[e]
            elif k in fused_gu:
                L = fused_gu[k]
                gu = _cast(ck.tensor(k), dtype)
                for f in FAMILY_ORDER:
                    if f in arts.families:
                        compat.family_rows(gu, f).copy_(rec.get(f, L))
                yield k, gu
            else:
                yield k, _cast(ck.tensor(k), dtype)
    return plan, produce


def globe_plan(ck: Checkpoint, arts: Artifacts, dtype: torch.dtype, save_mixed: bool) -> tuple[Plan, Producer]:
    """Untouched tensors under in-memory names + the families (see the module docstring)."""
    names, _ = model_names(ck)
    cover = covered_names(ck)
    unused = sorted(k for m, k in cover.items() if m not in names)
    if unused:
        log("export globe: %d tensor(s) on disk are not part of the model and are left out, e.g. %s",
            len(unused), unused[0])
    keep = {m: k for m, k in cover.items() if m in names}
    E, p, d = ck.num_experts, ck.p, ck.hidden_size
    items: list[tuple[int, str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]] = []
    for m, k in keep.items():
        items.append((_layer_of(k, ck), m, _float_dtype(ck, k, dtype), tuple(ck.shape(k)),
                      lambda k=k: _cast(ck.tensor(k), dtype)))
    for L in ck.moe_layers:
        fp = compat.experts_prefix(ck.spec, L)
        items.append((L, f"{fp}.down_proj", dtype, (E, d, p), lambda L=L: _stack(ck, L, "down", dtype)))
        for f in FAMILY_ORDER:
            if f not in arts.families:
                items.append((L, f"{fp}.W_{f}", dtype, (E, p, d), lambda L=L, f=f: _stack(ck, L, f, dtype)))
        ids = arts.kept_in_layer(L)
        for f in arts.families if ids else ():  # kept uncompressed: the source's gate/up of those experts
            items.append((L, f"{fp}.kept_{f}", dtype, (len(ids), p, d),
                          lambda L=L, f=f, ids=ids: _stack(ck, L, f, dtype, ids)))
    items.sort(key=lambda x: (x[0], x[1]))
    plan: Plan = [(n, dt, s) for _, n, dt, s, _ in items]
    for f, fam in arts.families.items():
        plan += fam.plan(f, arts.moe_layers, dtype, mixed=save_mixed)

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for _, n, _, _, fn in items:
            yield n, fn()
        for f, fam in arts.families.items():
            yield from fam.tensors(f, arts.moe_layers, dtype, compose=_composer(fam, dtype) if save_mixed else None)
    return plan, produce


def check_finite(name: str, t: torch.Tensor, dtype: str) -> None:
    """GlobeError naming the tensor when a floating tensor about to be written holds NaN/inf: a damaged source
    tensor, a fit that went wrong, or a value beyond the range of `dtype` (fp16 tops out at 65504)."""
    bad = count_non_finite(t)
    if bad:
        raise GlobeError(f"export: tensor {name} holds {bad} NaN/inf value(s) in {dtype}: the source "
                         f"checkpoint or the fit's artifacts are damaged, or values exceed {dtype}'s range")


def _stack(ck: Checkpoint, L: int, family: str, dtype: torch.dtype, experts: list[int] | None = None) -> torch.Tensor:
    """(n, p, d) gate/up or (n, d, p) down of `experts` (default all E) of layer L in dtype, one expert
    read at a time."""
    ids = list(range(ck.num_experts)) if experts is None else list(experts)
    first = ck.expert(L, ids[0], family)
    out = torch.empty((len(ids), *first.shape), dtype=dtype)
    out[0] = first
    for j, e in enumerate(ids[1:], 1):
        out[j] = ck.expert(L, e, family)
    return out


def _composer(fam: Family, dtype: torch.dtype) -> Callable[[int], torch.Tensor]:
    """compose(i) -> tilde_B (r, d) with the runtime's kernel on the bank cast to dtype (bit-identical to
    what a loaded model composes)."""
    from ..artifacts import sparse_codes

    G, m, r, d = fam.bank.shape
    indptr, indices, values = sparse_codes(fam.codes.cpu())
    bc = BankCodes(fam.bank.to(dtype).reshape(G, m, r * d), indptr.tolist(), indices.tolist(), values.tolist(), r, d,
                   fam.gain.float().tolist(), fam.activation,
                   None if fam.col_scale is None else fam.col_scale.float(),
                   [b for b in fam.layer_bank for _ in range(fam.num_experts)])
    return lambda i: compose_many(bc, [i], dtype)[0]


DENSE_KEY = "globe_dense_export"  # config.json of a dense export: {source, artifacts}; eval labels it "dense"


def _dense_config(ck: Checkpoint, ecfg: ExportCfg) -> dict[str, Any]:
    conf = dict(ck.export_config() if hasattr(ck, "export_config") else ck.config)
    conf["torch_dtype"] = conf["dtype"] = str(DTYPES[ecfg.dtype]).removeprefix("torch.")  # e.g. "bfloat16"
    return conf


def _globe_config(ck: Checkpoint, arts: Artifacts, ecfg: ExportCfg, cache: CacheCfg, src: str,
                  total: int) -> dict[str, Any]:
    conf = _dense_config(ck, ecfg)
    base = conf["model_type"]
    conf["model_type"] = GLOBE_PREFIX + base
    conf["architectures"] = ["GlobeForCausalLM"]
    conf["auto_map"] = auto_map()
    conf["globe"] = {**arts.meta(), "dtype": ecfg.dtype, "save_mixed": bool(ecfg.save_mixed),
                     "experts_paths": {str(L): compat.experts_prefix(ck.spec, L) for L in ck.moe_layers},
                     "cache": asdict(cache), "base_model_type": base, "weights_prefix": "model",
                     "source": str(ck.dir), "artifacts": src, "bytes_on_disk": total,
                     "original_bytes": ck.bytes_on_disk(), "keep_fp32": list(KEEP_FP32)}
    return conf


def _copy_side_files(src: Path, dst: Path) -> None:
    for pat in COPY_PATTERNS:
        for f in src.glob(pat):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)

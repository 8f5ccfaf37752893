"""Export a GloBE-compressed model (format=globe) or a dense reconstruction (format=dense); reload it.

Why two formats: `globe` is the small one and needs `globe.load_model`; `dense` is a standard
transformers checkpoint with W_hat written into the expert weights, for runtimes that cannot import
globe (vLLM, SGLang, plain `AutoModelForCausalLM.from_pretrained`).

globe directory:
  config.json              the model's config plus a `globe` section (families, dtype, save_mixed, cache, sizes)
  globe_model.safetensors  (not model.safetensors, so plain transformers fails loudly instead of
                           loading random experts)
      <name>                              every non-expert tensor, in-memory transformers names
      globe.layers.{L}.down_proj          (E, d, p)   Down, dense
      globe.layers.{L}.{f}.A              (E, p, r)   fitted family f, scales folded
      globe.layers.{L}.{f}_proj           (E, p, d)   family f when it was not fitted (dense)
      globe.layers.{L}.{f}.mixed          (E, r, d)   save_mixed=true: precomposed tilde_B
      globe.{f}.bank                      (m, r, d)   save_mixed=false: bank ...
      globe.{f}.indptr/indices/values     CSR codes (N+1,) int64, (nnz,) int32, (nnz,) fp32
      globe.{f}.col_scale                 (d,) fp32, optional
  tokenizer files, generation_config.json copied from the source.
Reload composes with the same kernels from the same cast tensors, so its logits equal those of
`patch_model(from_pretrained(src, dtype), artifacts)` exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import compat
from ..artifacts import Artifacts
from ..config import CacheCfg, GlobeConfig
from ..errors import GlobeError
from ..io.checkpoint import Checkpoint, resolve_path
from .cache import FamilyRuntime
from .experts import FAMILY_ORDER
from .patch import LayerParts, check_artifacts, install, warmup

log = logging.getLogger("globe")
WEIGHTS = "globe_model.safetensors"
FORMAT, VERSION = "globe-model", 1
COPY_PATTERNS = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "*.model", "*.tiktoken",
                 "added_tokens.json", "chat_template*", "generation_config.json")


def is_globe_dir(path: str | os.PathLike) -> bool:
    """True when `path` holds a GloBE export (config.json with a `globe` section)."""
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and "globe" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, OSError):
        return False


# ---- export ------------------------------------------------------------------------------------------
def export(cfg: GlobeConfig) -> Path:
    """Write cfg.output_dir from cfg.model.path + cfg.artifacts per cfg.export (format, dtype, save_mixed)."""
    out = _check_out(cfg.output_dir)
    if not cfg.artifacts:
        raise GlobeError("artifacts: give the fit output directory (artifacts=DIR)")
    ckpt = Checkpoint(cfg.model.path, cfg.model.revision)
    arts = Artifacts.load(cfg.artifacts)
    _check_ckpt(ckpt, arts)  # model-free, before any weight is read
    dtype = compat.DTYPES[cfg.export.dtype]
    model = compat.load_pretrained(ckpt.dir, dtype)
    check_artifacts(model, arts)
    with _staging(out) as tmp:
        if cfg.export.format == "dense":
            _write_dense(model, arts, tmp)
        else:
            _write_globe(model, arts, cfg, tmp, ckpt)
        _copy_side_files(ckpt.dir, tmp)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    log.info("exported %s model to %s: %d bytes of weights (original %d, ratio %.3f)", cfg.export.format, out,
             size, ckpt.bytes_on_disk(), size / max(1, ckpt.bytes_on_disk()))
    return out


def _check_out(output_dir: str | None) -> Path:
    if not output_dir:
        raise GlobeError("output_dir: required (where to write the exported model)")
    out = Path(output_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GlobeError(f"output_dir {out} exists and is not empty; choose a new directory")
    return out


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary directory next to `out`, renamed onto it only when everything was written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the export should look like any directory
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked), so the rename can take its place
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_ckpt(ckpt: Checkpoint, arts: Artifacts) -> None:
    got = (ckpt.model_type, list(ckpt.moe_layers), ckpt.num_experts, ckpt.hidden_size, ckpt.p)
    want = (arts.model_type, list(arts.moe_layers), arts.num_experts, arts.hidden_size, arts.expert_intermediate_size)
    names = ("model_type", "MoE layers", "experts per layer", "hidden size", "expert width")
    for n, g, w in zip(names, got, want):
        if g != w:
            raise GlobeError(f"artifacts do not match the model: {n} {w} in the artifacts, {g} in {ckpt.dir}")


def _copy_side_files(src: Path, dst: Path) -> None:
    for pat in COPY_PATTERNS:
        for f in src.glob(pat):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)


@torch.no_grad()
def _write_dense(model: nn.Module, arts: Artifacts, tmp: Path) -> None:
    """W_hat (fp32 from the artifacts, cast to the export dtype) into gate_up_proj; save_pretrained."""
    for L in arts.moe_layers:
        mod = compat.get_experts(model, L)
        p, sl = compat.experts_info(mod).p, arts.layer_slice(L)
        idx = torch.arange(sl.start, sl.stop)
        for i, f in enumerate(FAMILY_ORDER):
            if f in arts.families:
                mod.gate_up_proj[:, i * p:(i + 1) * p] = arts.families[f].reconstruct(idx).to(mod.gate_up_proj)
    model.save_pretrained(str(tmp))


def globe_tensors(model: nn.Module, arts: Artifacts, dtype: torch.dtype, save_mixed: bool) -> dict[str, torch.Tensor]:
    """Every tensor of a globe export (see the module docstring), built from an unpatched model."""
    layers = compat.moe_layer_ids(model)
    prefixes = tuple(compat.experts_path(model, L) + "." for L in layers)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if name.startswith(prefixes) or key in seen:  # experts, or a tied alias (re-tied at load)
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    dev = torch.device("cpu")
    fams = {f: FamilyRuntime.from_artifact(f, fa, dtype, dev) for f, fa in arts.families.items()}
    for li, L in enumerate(layers):
        mod = compat.get_experts(model, L)
        info = compat.experts_info(mod)
        E, p, sl = info.num_experts, info.p, arts.layer_slice(L)
        out[f"globe.layers.{L}.down_proj"] = mod.down_proj.detach().cpu().contiguous()
        for i, f in enumerate(FAMILY_ORDER):
            if f in arts.families:
                out[f"globe.layers.{L}.{f}.A"] = arts.families[f].A[sl].to(dtype).contiguous()
                if save_mixed:
                    out[f"globe.layers.{L}.{f}.mixed"] = torch.stack([fams[f].compose(li * E + e, dtype)
                                                                       for e in range(E)])
            else:
                out[f"globe.layers.{L}.{f}_proj"] = mod.gate_up_proj.detach()[:, i * p:(i + 1) * p].cpu().contiguous()
    if not save_mixed:
        for f, fr in fams.items():
            m = fr.bank.shape[0]
            out[f"globe.{f}.bank"] = fr.bank.view(m, fr.r, fr.d).contiguous()
            out[f"globe.{f}.indptr"] = torch.tensor(fr.indptr, dtype=torch.int64)
            out[f"globe.{f}.indices"] = fr.indices.to(torch.int32)
            out[f"globe.{f}.values"] = fr.values.float()
            if fr.col_scale is not None:
                out[f"globe.{f}.col_scale"] = fr.col_scale
    return out


def _write_globe(model: nn.Module, arts: Artifacts, cfg: GlobeConfig, tmp: Path, ckpt: Checkpoint) -> None:
    dtype = compat.DTYPES[cfg.export.dtype]
    tensors = globe_tensors(model, arts, dtype, cfg.export.save_mixed)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    model.config.save_pretrained(str(tmp))
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(str(tmp))
    conf = json.loads((tmp / "config.json").read_text())
    fams = {}
    for f, fa in arts.families.items():
        n, m, p, r, d = fa.shape
        fams[f] = {"m": m, "r": r, "activation": fa.activation, "gain": float(fa.gain),
                   "nnz": int((fa.codes != 0).sum()), "col_scale": fa.col_scale is not None, **fa.meta}
    conf["globe"] = {
        "format": FORMAT, "version": VERSION, "dtype": cfg.export.dtype, "save_mixed": bool(cfg.export.save_mixed),
        "weights": WEIGHTS, "moe_layers": list(arts.moe_layers), "num_experts": arts.num_experts,
        "hidden_size": arts.hidden_size, "expert_intermediate_size": arts.expert_intermediate_size,
        "families": fams, "cache": asdict(cfg.cache), "source": str(ckpt.dir), "artifacts": str(cfg.artifacts),
        "bytes_on_disk": (tmp / WEIGHTS).stat().st_size, "original_bytes": ckpt.bytes_on_disk(),
    }
    (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


# ---- load --------------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, cache: CacheCfg | None = None,
               collect_stats: bool = False) -> nn.Module:
    """Load a model for inference: a GloBE export is rebuilt patched; any other directory loads plainly.

    device: default cpu. dtype: 'bf16'|'fp16'|'fp32'|torch.dtype, default as exported/stored.
    cache: overrides the cache settings saved at export (a save_mixed export always has every tilde_B).
    """
    p = resolve_path(str(path))
    dev = torch.device(device or "cpu")
    if not is_globe_dir(p):
        return compat.load_pretrained(p, compat.to_dtype(dtype), dev)
    meta = json.loads((p / "config.json").read_text())["globe"]
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise GlobeError(f"{p}: unsupported globe export format {meta.get('format')!r} v{meta.get('version')}")
    dt = compat.to_dtype(dtype, compat.DTYPES[meta["dtype"]])
    cache = cache or CacheCfg(**meta.get("cache", {}))
    config = compat.load_config(p)
    if hasattr(config, "globe"):
        delattr(config, "globe")
    wfile = p / meta.get("weights", WEIGHTS)
    if not wfile.is_file():
        raise GlobeError(f"{p}: missing weights file {wfile.name}")
    try:
        t = load_file(str(wfile), device=str(dev))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise GlobeError(f"corrupt or truncated weights file {wfile}: {str(e).splitlines()[0]}") from None
    t = {k: v.to(dt) if v.is_floating_point() and not k.endswith((".values", ".col_scale")) else v
         for k, v in t.items()}
    model = compat.empty_model(config, dt)
    families = _families(t, meta, p)
    parts = _parts(model, t, meta, p)
    install(model, parts, families, replace(cache, warmup_tokens=0), collect_stats, keep_original=False)
    compat.assign_weights(model, t, str(wfile))
    model._globe["cache"] = cache
    model.to(dev)
    if cache.mode == "lru" and int(cache.warmup_tokens) > 0:
        warmup(model, None, int(cache.warmup_tokens))
    return model.eval()


def _take(t: dict[str, torch.Tensor], key: str, where: Path) -> torch.Tensor:
    if key not in t:
        raise GlobeError(f"{where}: weights file lacks tensor {key} (truncated or from another export)")
    return t.pop(key)


def _families(t: dict[str, torch.Tensor], meta: dict[str, Any], where: Path) -> dict[str, FamilyRuntime]:
    out = {}
    for f, fm in meta["families"].items():
        if meta["save_mixed"]:
            out[f] = FamilyRuntime(f, None, None, None, None, int(fm["r"]), int(meta["hidden_size"]), fm["gain"],
                                   fm["activation"])
            continue
        cs = _take(t, f"globe.{f}.col_scale", where) if fm.get("col_scale") else None
        out[f] = FamilyRuntime(f, _take(t, f"globe.{f}.bank", where), _take(t, f"globe.{f}.indptr", where),
                               _take(t, f"globe.{f}.indices", where).long(), _take(t, f"globe.{f}.values", where),
                               int(fm["r"]), int(meta["hidden_size"]), fm["gain"], fm["activation"], cs)
    return out


def _parts(model: nn.Module, t: dict[str, torch.Tensor], meta: dict[str, Any], where: Path) -> dict[int, LayerParts]:
    layers = compat.moe_layer_ids(model)
    if layers != list(meta["moe_layers"]):
        raise GlobeError(f"{where}: config.json MoE layers {layers} differ from the globe section's "
                         f"{meta['moe_layers']}")
    parts = {}
    for L in layers:
        pre = f"globe.layers.{L}"
        lp = LayerParts(down=nn.Parameter(_take(t, f"{pre}.down_proj", where), requires_grad=False))
        for f in FAMILY_ORDER:
            if f in meta["families"]:
                lp.A[f] = _take(t, f"{pre}.{f}.A", where)
                if meta["save_mixed"]:
                    lp.mixed[f] = _take(t, f"{pre}.{f}.mixed", where)
            else:
                lp.dense[f] = _take(t, f"{pre}.{f}_proj", where)
        parts[L] = lp
    return parts

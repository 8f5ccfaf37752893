"""Reading fit directories and globe exports into `globe.artifacts.Artifacts` (the format: see there).

Why apart: `Artifacts.load` opens a directory (a v2 or v1 fit directory, or a globe export), checks the
format version, builds each Family from the metadata with every tensor's dtype and shape checked
(damaged files are one line naming the tensor), converts version-1 fit directories, and merges fit
directories of the same model that hold different families. Adapters A (E, p, r) stay on disk until
asked for (`Family.load_A`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..artifacts import CONFIG, FORMAT, PREFIX, VERSION, Artifacts, Family, check_gains, dense_codes, key, sparse_codes
from ..common import has_zero_row
from ..errors import GlobeError
from ..maps import get_activation
from .tensors import DictSource, TensorDir


def open_dir(d: Path):
    """(meta, tensor source) of a fit directory or a globe export."""
    cfg, export_cfg = d / CONFIG, d / "config.json"
    if cfg.is_file():
        try:
            meta = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise GlobeError(f"corrupt artifact config {cfg}: {e}") from None
        if not isinstance(meta, dict):
            raise GlobeError(f"corrupt artifact config {cfg}: expected a JSON object, got {type(meta).__name__}")
        if meta.get("format") == "globe-artifacts" and int(meta.get("version", 0)) == 1:
            return convert_v1(d, meta)
        check_version(meta, cfg)
        return meta, TensorDir(d, PREFIX)
    if export_cfg.is_file():
        try:
            conf = json.loads(export_cfg.read_text())
        except json.JSONDecodeError as e:
            raise GlobeError(f"corrupt {export_cfg}: {e}") from None
        meta = conf.get("globe") if isinstance(conf, dict) else None
        if meta:
            check_version(meta, export_cfg)
            return meta, TensorDir(d, meta.get("weights_prefix", "model"))
    raise GlobeError(f"missing artifact file: {cfg} (not a GloBE fit directory or export)")


def check_version(meta: dict[str, Any], where: Path) -> None:
    fmt, ver = meta.get("format"), meta.get("version")
    if fmt == "globe-model":
        raise GlobeError(f"{where}: a globe export of format version {ver} (globe-model); this globe reads "
                         f"version {VERSION}: export it again from its fit directory")
    if fmt != FORMAT:
        raise GlobeError(f"{where} is not a GloBE artifact config (format {fmt!r})")
    if int(ver or 0) != VERSION:
        raise GlobeError(f"{where}: GloBE format version {ver}; this globe reads version {VERSION} "
                         "(and converts version 1 fit directories)")


def from_meta(meta: dict[str, Any], src, device: str | torch.device = "cpu") -> Artifacts:
    """Build Artifacts from metadata and a tensor source; A stays on disk until asked for."""
    dev = torch.device(device)
    try:
        layers, E = [int(x) for x in meta["moe_layers"]], int(meta["num_experts"])
        fams = {}
        for f, fm in meta["families"].items():
            def take(name: str, f=f) -> torch.Tensor:
                if name not in src:
                    raise GlobeError(f"artifact tensors lack {name} (truncated, or another format)")
                t = src.tensor(name)
                want_float = not name.endswith(("indptr", "indices"))
                if t.is_floating_point() != want_float:
                    raise GlobeError(f"artifact tensor {name} is {t.dtype}, expected "
                                     f"{'a floating' if want_float else 'an integer'} dtype (damaged file)")
                return t
            bank = take(key(f, "bank")).to(dev)
            if bank.ndim != 4 or has_zero_row(bank):
                raise GlobeError(f"artifact family {f}: bank of shape {list(bank.shape)} is not (G, m, r, d) of "
                                 "nonzero atoms (damaged file)")
            codes = dense_codes(take(key(f, "indptr")), take(key(f, "indices")), take(key(f, "values")),
                                bank.shape[1], f"artifact family {f}")
            cs = take(key(f, "col_scale")).to(dev) if fm.get("col_scale") else None
            gain = take(key(f, "gain")).float()
            if tuple(gain.shape) != (bank.shape[0],):
                raise GlobeError(f"artifact family {f}: gain of shape {list(gain.shape)}, expected one value per bank "
                                 f"({bank.shape[0]}) (damaged file)")
            check_gains(gain.tolist(), f"artifact family {f}")
            act = fm.get("activation", "silu")
            try:
                get_activation(act)
            except GlobeError as e:
                raise GlobeError(f"artifact family {f}: {e} (damaged globe_config.json)") from None
            want_A = (E, int(meta["expert_intermediate_size"]), bank.shape[2])

            def load_A(li, f=f, take=take, want=want_A):
                a = take(key(f, "A", layers[li]))
                if tuple(a.shape) != want:
                    raise GlobeError(f"artifact tensor {key(f, 'A', layers[li])} has shape {list(a.shape)}, "
                                     f"expected {list(want)} (E, p, r) (damaged file)")
                return a.to(dev)
            fams[f] = Family(bank=bank, codes=codes.to(dev), gain=gain,
                             layer_bank=[int(b) for b in fm.get("layer_bank", [0] * len(layers))],
                             num_experts=E, activation=act, col_scale=cs,
                             meta={k: v for k, v in fm.items() if k not in ("m", "r", "banks", "layer_bank", "kept",
                                                                            "activation", "col_scale", "nnz")},
                             load_A=load_A,
                             p=int(meta["expert_intermediate_size"]),
                             kept=list(fm.get("kept") or []))
        arts = Artifacts(families=fams, model_type=meta["model_type"], moe_layers=layers, num_experts=E,
                         hidden_size=int(meta["hidden_size"]),
                         expert_intermediate_size=int(meta["expert_intermediate_size"]),
                         source=meta.get("source", ""), config=meta.get("config", {}),
                         source_digest=dict(meta.get("source_digest") or {}))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise GlobeError(f"artifact metadata incomplete or malformed ({type(e).__name__}: {e})") from None
    arts.validate()
    return arts


def convert_v1(d: Path, meta: dict[str, Any]):
    """Version-1 fit directory -> (v2 meta, in-memory source): bank (m,r,d) -> (1,m,r,d), codes -> CSR, A per layer."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = d / "globe.safetensors"
    if not path.is_file():
        raise GlobeError(f"missing artifact file: {path}")
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise GlobeError(f"corrupt or truncated artifact file {path}: {e}") from None
    layers, E = list(meta["moe_layers"]), int(meta["num_experts"])
    out: dict[str, torch.Tensor] = {}
    fams = {}
    for f, fm in meta["families"].items():
        try:
            bank, codes, A = t[f"{f}.bank"], t[f"{f}.codes"], t[f"{f}.A"]
        except KeyError as e:
            raise GlobeError(f"artifact file {path} lacks tensor {e.args[0]}") from None
        indptr, indices, values = sparse_codes(codes)
        out.update({key(f, "bank"): bank[None], key(f, "gain"): t[f"{f}.gain"].reshape(1).float(),
                    key(f, "indptr"): indptr, key(f, "indices"): indices, key(f, "values"): values})
        if f"{f}.col_scale" in t:
            out[key(f, "col_scale")] = t[f"{f}.col_scale"]
        for li, L in enumerate(layers):
            out[key(f, "A", L)] = A[li * E:(li + 1) * E]
        fams[f] = {**fm, "banks": 1, "layer_bank": [0] * len(layers), "col_scale": f"{f}.col_scale" in t}
    new = {**meta, "format": FORMAT, "version": VERSION, "families": fams, "converted_from_version": 1}
    return new, DictSource(out)


def merge(parts: list[Artifacts], where: str) -> Artifacts:
    """Combine fit directories of the same model that hold different families."""
    base = parts[0]
    ident = (base.model_type, base.moe_layers, base.num_experts, base.hidden_size, base.expert_intermediate_size)
    for other in parts[1:]:
        if (other.model_type, other.moe_layers, other.num_experts, other.hidden_size,
                other.expert_intermediate_size) != ident:
            raise GlobeError(f"artifacts {where}: the directories were fitted on different models")
        dup = set(base.families) & set(other.families)
        if dup:
            raise GlobeError(f"artifacts {where}: family {sorted(dup)[0]} appears twice")
        base.families.update(other.families)
        base.source_digest = {**base.source_digest, **other.source_digest}
    base.validate()  # e.g. families fitted with different bank.keep_fraction keep different experts
    return base



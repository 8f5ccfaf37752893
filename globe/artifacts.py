"""The fit's output: one global bank per family plus per-expert adapters and sparse codes.

Why a module of its own: the fit engine writes these, the runtime, export and eval read them. The
files are `DIR/globe.safetensors` (tensors) and `DIR/globe_config.json` (metadata).

Experts are numbered layer-major over the MoE layers: expert index i = li * E + e, where li is the
position of the layer in `moe_layers` and e the expert id inside that layer. Per family f:

    f.bank   (m, r, d)  fp32   atoms B_j, shared by every MoE layer
    f.codes  (N, m)     fp32   mixture weights alpha_i after epsilon-pruning (zeros are pruned)
    f.A      (N, p, r)  fp32   adapters with the per-expert scale s_i folded in
    f.gain   ()         fp32   scalar g inside phi
    f.col_scale (d,)    fp32   optional per-input-column scale folded into tilde_B (absent = ones)

    W_hat_i = A_i @ (phi(g * sum_j alpha_ij B_j) * col_scale)      (p, d)

A family that was not fitted is absent: the runtime keeps those experts dense.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import GlobeError

FORMAT_VERSION = 1
TENSORS = "globe.safetensors"
CONFIG = "globe_config.json"


def activation_fn(name: str):
    if name == "silu":
        return torch.nn.functional.silu
    if name == "tanh":
        return torch.tanh
    if name == "identity":
        return lambda x: x
    raise GlobeError(f"unknown activation {name!r}")


@dataclass
class FamilyArtifact:
    bank: torch.Tensor  # (m, r, d)
    codes: torch.Tensor  # (N, m)
    A: torch.Tensor  # (N, p, r)
    gain: float = 1.0
    activation: str = "silu"
    col_scale: torch.Tensor | None = None  # (d,)
    meta: dict[str, Any] = field(default_factory=dict)  # map, temperature, eps_prune, ...

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(N, m, p, r, d)."""
        n, p, r = self.A.shape
        m, _, d = self.bank.shape
        return n, m, p, r, d

    def mixed(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """tilde_B for experts idx (all if None): (n, r, d) = phi(g * codes @ bank) * col_scale."""
        codes = self.codes if idx is None else self.codes[idx]
        m, r, d = self.bank.shape
        mix = (codes.to(self.bank.dtype) @ self.bank.reshape(m, r * d)).reshape(-1, r, d)
        out = activation_fn(self.activation)(self.gain * mix)
        if self.col_scale is not None:
            out = out * self.col_scale
        return out

    def reconstruct(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """W_hat for experts idx: (n, p, d) in fp32."""
        a = self.A if idx is None else self.A[idx]
        return torch.bmm(a.float(), self.mixed(idx).float())

    def stored_params(self) -> int:
        """Everything kept for this family: bank, all A_i, nonzero codes (+ their indices), gain."""
        n, m, p, r, d = self.shape
        nnz = int((self.codes != 0).sum())
        extra = 0 if self.col_scale is None else d
        return m * r * d + n * p * r + nnz + 1 + extra


@dataclass
class Artifacts:
    families: dict[str, FamilyArtifact]
    model_type: str
    moe_layers: list[int]
    num_experts: int
    hidden_size: int
    expert_intermediate_size: int
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # resolved GlobeConfig as a dict

    def index(self, layer: int, expert: int) -> int:
        return self.moe_layers.index(layer) * self.num_experts + expert

    def layer_slice(self, layer: int) -> slice:
        li = self.moe_layers.index(layer)
        return slice(li * self.num_experts, (li + 1) * self.num_experts)

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        fam_meta: dict[str, Any] = {}
        for f, fa in self.families.items():
            tensors[f"{f}.bank"] = fa.bank.detach().float().contiguous().cpu()
            tensors[f"{f}.codes"] = fa.codes.detach().float().contiguous().cpu()
            tensors[f"{f}.A"] = fa.A.detach().float().contiguous().cpu()
            tensors[f"{f}.gain"] = torch.tensor(float(fa.gain))
            if fa.col_scale is not None:
                tensors[f"{f}.col_scale"] = fa.col_scale.detach().float().contiguous().cpu()
            n, m, p, r, d = fa.shape
            fam_meta[f] = {"m": m, "r": r, "activation": fa.activation, **fa.meta}
        meta = {
            "format": "globe-artifacts", "version": FORMAT_VERSION, "model_type": self.model_type,
            "source": self.source, "moe_layers": list(self.moe_layers),
            "num_experts": self.num_experts, "hidden_size": self.hidden_size,
            "expert_intermediate_size": self.expert_intermediate_size, "families": fam_meta,
            "config": self.config,
        }
        atomic_write(out / TENSORS, lambda p: save_file(tensors, p))
        atomic_write(out / CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))

    @classmethod
    def load(cls, art_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Artifacts:
        """Load one fit directory, or merge several given as "DIR_UP,DIR_GATE" (one family each)."""
        if isinstance(art_dir, str) and "," in art_dir:
            parts = [cls.load(p.strip(), device) for p in art_dir.split(",") if p.strip()]
            base = parts[0]
            for other in parts[1:]:
                same = (other.model_type, other.moe_layers, other.num_experts, other.hidden_size,
                        other.expert_intermediate_size)
                if same != (base.model_type, base.moe_layers, base.num_experts, base.hidden_size,
                            base.expert_intermediate_size):
                    raise GlobeError(f"artifacts {art_dir}: the directories were fitted on different models")
                dup = set(base.families) & set(other.families)
                if dup:
                    raise GlobeError(f"artifacts {art_dir}: family {sorted(dup)[0]} appears twice")
                base.families.update(other.families)
            return base
        d = Path(art_dir)
        cfg_path, ten_path = d / CONFIG, d / TENSORS
        if not d.is_dir():
            raise GlobeError(f"artifacts directory not found: {d}")
        for pth in (cfg_path, ten_path):
            if not pth.is_file():
                raise GlobeError(f"missing artifact file: {pth}")
        try:
            meta = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise GlobeError(f"corrupt artifact config {cfg_path}: {e}") from None
        if meta.get("format") != "globe-artifacts":
            raise GlobeError(f"{cfg_path} is not a GloBE artifact config")
        try:
            t = load_file(str(ten_path), device=str(device))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise GlobeError(f"corrupt or truncated artifact file {ten_path}: {e}") from None
        fams = {}
        for f, fm in meta["families"].items():
            try:
                fams[f] = FamilyArtifact(
                    bank=t[f"{f}.bank"], codes=t[f"{f}.codes"], A=t[f"{f}.A"],
                    gain=float(t[f"{f}.gain"]), activation=fm.get("activation", "silu"),
                    col_scale=t.get(f"{f}.col_scale"),
                    meta={k: v for k, v in fm.items() if k not in ("m", "r", "activation")},
                )
            except KeyError as e:
                raise GlobeError(f"artifact file {ten_path} lacks tensor {e.args[0]}") from None
        arts = cls(families=fams, model_type=meta["model_type"], moe_layers=list(meta["moe_layers"]),
                   num_experts=int(meta["num_experts"]), hidden_size=int(meta["hidden_size"]),
                   expert_intermediate_size=int(meta["expert_intermediate_size"]),
                   source=meta.get("source", ""), config=meta.get("config", {}))
        arts.validate()
        return arts

    def validate(self) -> None:
        n = len(self.moe_layers) * self.num_experts
        for f, fa in self.families.items():
            nn_, m, p, r, d = fa.shape
            if fa.codes.shape != (n, m) or nn_ != n:
                raise GlobeError(f"artifact family {f}: expected {n} experts, codes {tuple(fa.codes.shape)}")
            if p != self.expert_intermediate_size or d != self.hidden_size:
                raise GlobeError(f"artifact family {f}: expert shape ({p}, {d}) does not match "
                                 f"({self.expert_intermediate_size}, {self.hidden_size})")
            if fa.bank.shape[1] != r:
                raise GlobeError(f"artifact family {f}: bank rank {fa.bank.shape[1]} != A rank {r}")


def atomic_write(path: str | os.PathLike, writer) -> None:
    """Write via a temporary file in the same directory, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

"""Sparse maps (logits -> codes) and activations phi: one table entry each.

Why: a sparse map or an activation used to be written in five places (config, the fit's if-chain,
softmax special cases in the loop and the temperature controller, the runtime's in-place phi, tests).
Here each is ONE entry, registered by a decorator the way torchao registers handlers and peft
registers methods; config validates against the keys, the fit, temperature control, artifacts and
the runtime look entries up, and the tests parametrise over the keys:

    @register_sparse_map("name", dense=False)       fn(x (..., m) fp32 = z / T, alpha) -> codes (..., m)
    register_activation(Activation("name", fn, fn_, grad))

Sparse maps act on the last dim and return points of the simplex, unchanged when a constant is added
to z (the fit centres each expert's logits); `sparse_map` divides by T in fp32 (entmax NaNs in half
precision), so an entry only maps. `dense=True` (softmax): every code is
nonzero at any T, so there is no temperature to control and no support target to reach.
An activation has phi out of place (fit, artifacts), phi in place on an fp32 buffer (the runtime's
composition kernel) and phi' (calibration's row weights); the two phi must give the same bits.

This module is copied verbatim into every globe export's modeling_globe.py (runtime/remote.py), which
must run where globe is not installed: it imports only torch at module level (entmax inside its
entries) and nothing from globe but GlobeError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import GlobeError


@dataclass(frozen=True)
class SparseMap:
    name: str
    fn: Callable[[torch.Tensor, float], torch.Tensor]  # (x = z / T (..., m) fp32, alpha) -> codes (..., m)
    dense: bool = False  # codes are all nonzero at any T: no temperature control, no support target


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]  # phi(x), out of place
    fn_: Callable[[torch.Tensor], object]  # phi applied in place to an fp32 tensor (same bits as fn)
    grad: Callable[[torch.Tensor], torch.Tensor]  # phi'(x)


SPARSE_MAPS: dict[str, SparseMap] = {}
ACTIVATIONS: dict[str, Activation] = {}


def register_sparse_map(name: str, *, dense: bool = False) -> Callable:
    """Decorator: fn(x, alpha) becomes the sparse map `name` (config `sparsity.map`)."""
    def deco(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> Callable:
        if name in SPARSE_MAPS:
            raise GlobeError(f"sparse map {name!r} is registered twice")
        SPARSE_MAPS[name] = SparseMap(name, fn, dense)
        return fn
    return deco


def register_activation(act: Activation) -> Activation:
    """Adds phi `act.name` (config `bank.activation`)."""
    if act.name in ACTIVATIONS:
        raise GlobeError(f"activation {act.name!r} is registered twice")
    ACTIVATIONS[act.name] = act
    return act


def get_sparse_map(name: str) -> SparseMap:
    if name not in SPARSE_MAPS:
        raise GlobeError(f"unknown sparse map {name!r}; choose one of {', '.join(SPARSE_MAPS)}")
    return SPARSE_MAPS[name]


def get_activation(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise GlobeError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def sparse_map(z: torch.Tensor, T: float, kind: str = "entmax", alpha: float = 1.5) -> torch.Tensor:
    """alpha = sparsemap(z / T) over the last dim, computed in fp32. (n, m) -> (n, m)."""
    fn = get_sparse_map(kind).fn
    return fn(z.float() / float(T), alpha)


# ---- sparse maps ---------------------------------------------------------------------------------
@register_sparse_map("entmax")
def _entmax(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha-entmax (Peters et al. 2019); the exact sort-based 1.5-entmax at alpha = 1.5, else bisection."""
    from entmax import entmax15, entmax_bisect

    return entmax15(x, dim=-1) if abs(alpha - 1.5) < 1e-12 else entmax_bisect(x, alpha=alpha, dim=-1)


@register_sparse_map("sparsemax")
def _sparsemax(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Euclidean projection onto the simplex (= 2-entmax); alpha is not used."""
    from entmax import sparsemax

    return sparsemax(x, dim=-1)


@register_sparse_map("softmax", dense=True)
def _softmax(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Dense mixtures (ablation only); alpha is not used."""
    return torch.softmax(x, dim=-1)


# ---- activations phi -----------------------------------------------------------------------------
def _silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)


def _silu_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


register_activation(Activation("silu", F.silu, _silu_, _silu_grad))
register_activation(Activation("tanh", torch.tanh, torch.Tensor.tanh_, lambda x: 1 - torch.tanh(x) ** 2))
register_activation(Activation("identity", _identity, _identity, torch.ones_like))


# ---- statistics of codes (the fit's logs, wandb histograms, diagnostics all read these) -----------------
def support(codes: torch.Tensor) -> torch.Tensor:
    """Nonzero codes per expert: codes (..., m) -> (...,) int64."""
    return (codes != 0).sum(-1)


def code_stats(codes: torch.Tensor) -> dict[str, Any]:
    """Summary of codes (N, m): support_counts[k] = experts with k nonzero codes (k = 0..m),
    atom_popularity[j] = experts using atom j, atom_mass[j] = sum of |codes| on atom j, unused_atoms,
    median_support, mean_support."""
    codes = codes.detach().float().cpu()
    nz = codes != 0
    sup = nz.sum(-1)
    pop = nz.sum(0)
    return {"support_counts": torch.bincount(sup, minlength=codes.shape[-1] + 1).tolist(),
            "median_support": float(sup.float().median()) if sup.numel() else 0.0,
            "mean_support": float(sup.float().mean()) if sup.numel() else 0.0,
            "atom_popularity": pop.tolist(), "atom_mass": codes.abs().sum(0).tolist(),
            "unused_atoms": int((pop == 0).sum())}

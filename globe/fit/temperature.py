"""Temperature controller for the sparse map: support grows with T, so

    T <- clamp(T * exp(-eta * (median_support / target - 1)), T_min, T_max)

lowers T when the median support is above target and raises it when below (negative feedback).
`calibrate` finds by bisection in log T the temperature whose median support is closest to target.
"""

from __future__ import annotations

import math

import torch

from ..maps import get_sparse_map, sparse_map, support


class TempController:
    def __init__(self, T: float, target: int, eta: float, T_min: float = 1e-3, T_max: float = 1e3):
        self.T, self.target, self.eta, self.T_min, self.T_max = float(T), int(target), float(eta), T_min, T_max

    def update(self, median_support: float, target: float | None = None) -> float:
        """One controller step toward `target` (default: the final target); returns the new T."""
        tgt = float(self.target if target is None else target)
        T = self.T * math.exp(-self.eta * (float(median_support) / tgt - 1.0))
        self.T = min(max(T, self.T_min), self.T_max)
        return self.T

    def state_dict(self) -> dict:
        return {"T": self.T}

    def load_state_dict(self, s: dict) -> None:
        self.T = float(s["T"])


def support_schedule(step: int, steps: int, target: int, start: int, anneal_frac: float) -> float:
    """Support target at `step`: geometric decay from `start` to `target` over anneal_frac * steps."""
    n = anneal_frac * steps
    if start <= target or n <= 0 or step >= n:
        return float(target)
    return float(start) * (target / start) ** (step / n)


def median_support(z: torch.Tensor, T: float, kind: str, alpha: float) -> float:
    with torch.no_grad():
        return float(support(sparse_map(z, T, kind, alpha)).float().median())


def calibrate(z: torch.Tensor, target: int, kind: str, alpha: float, T_min: float = 1e-3,
              T_max: float = 1e3, iters: int = 40) -> float:
    """Smallest T in [T_min, T_max] whose median support reaches target (bisection on log T); 1 for a
    dense map (globe.maps), whose support is m at any T."""
    if get_sparse_map(kind).dense:
        return 1.0
    lo, hi = math.log(T_min), math.log(T_max)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if median_support(z, math.exp(mid), kind, alpha) >= target:
            hi = mid
        else:
            lo = mid
    return math.exp(hi)

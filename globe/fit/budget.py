"""Stored-parameter budgets: baselines compared at the same size, and the rank derived from a budget.

Per family with N experts of shape (p, d), G banks of m atoms (bank.share), nnz nonzero codes:
    original         N p d
    GloBE            G (m r d + 1) + N p r + nnz      [per-expert scales folded into A; +1: gain per bank]
    per-expert SVD   N k (p + d)
    MoBE-style       L m_l r d + N p r + N m_l        [dense codes, one bank per layer]

Budget-first settings (`bank.budget` = fraction of the routed Up+Gate parameters kept): `plan_rank`
derives r as the largest rank whose stored parameters, with nnz = N * target_support, stay within
budget * N p d, capped at min(p, d), and rounded DOWN to a multiple of `bank.r_multiple` (default 8:
torch's grouped_mm needs 16-byte aligned rows, and a bf16 row of A_i (p, r) is 2 r bytes; ranks below
the multiple are kept as they are). An explicit `bank.r` or `bank.r_frac` wins over the budget. A
budget below the smallest GloBE can store (r = 1) or above the largest it can use (r = min(p, d)) is a
ValueError naming the nearest feasible budget. Experts kept uncompressed (`bank.keep_fraction`) store
p d each and are counted: the fitted ones get what is left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..artifacts import globe_params, kept_count


def rank_for_budget(frac: float, N: int, p: int, d: int, m: int, support: int, r_max: int | None = None,
                    banks: int = 1) -> int:
    """Largest r with GloBE stored params <= frac * N p d (at least 1; no rounding to a multiple)."""
    target = frac * N * p * d - N * support - banks
    r = int(target // (banks * m * d + N * p))
    if r_max is not None:
        r = min(r, r_max)
    return max(1, r)


def svd_rank(stored: int, N: int, p: int, d: int) -> int:
    """SVD rank k whose N k (p+d) matches `stored` (nearest, >= 1, <= min(p, d))."""
    return int(min(max(1, round(stored / (N * (p + d)))), min(p, d)))


def mobe_rank(stored: int, N: int, L: int, p: int, d: int, m_l: int) -> int:
    """MoBE rank r with L m_l r d + N p r + N m_l closest to `stored` (>= 1)."""
    return int(max(1, round((stored - N * m_l) / (L * m_l * d + N * p))))


def mobe_params(N: int, L: int, p: int, d: int, m_l: int, r: int) -> int:
    return L * m_l * r * d + N * p * r + N * m_l


@dataclass
class RankPlan:
    """The rank of one family and where it came from."""

    r: int
    source: str  # "r" (bank.r) | "r_frac" (bank.r_frac) | "budget" (bank.budget)
    budget: float | None  # the budget asked (None unless source == "budget")
    predicted: float  # stored fraction predicted with nnz = N * target_support
    unrounded: tuple[int, float] | None = None  # (r, predicted) before rounding r down to bank.r_multiple

    def as_dict(self) -> dict[str, Any]:
        return {"r": self.r, "rank_source": self.source, "budget_asked": self.budget,
                "budget_predicted": self.predicted}


def plan_rank(N: int, p: int, d: int, m: int, support: int, *, banks: int = 1, r: int | None = None,
              r_frac: float | None = None, budget: float | None = None, multiple: int = 8,
              allow_r_above: bool = False, kept: int = 0) -> RankPlan:
    """r for one family: explicit r, else round(r_frac p), else derived from `budget` (see module doc).

    kept: experts kept uncompressed (bank.keep_fraction): they store p d each, counted in the budget, so
    the fitted experts get budget - kept / N (their adapters and one code each are still stored: the
    format keeps one A_i per expert).

    Raises ValueError("bank.budget: ...") when the budget cannot be met, with the nearest feasible one.
    """
    full = N * p * d

    def frac(rr: int) -> float:
        return (globe_params(N, p, d, m, rr, N * support, banks) + kept * p * d) / full

    if r is not None:
        return RankPlan(int(r), "r", None, frac(int(r)))
    if r_frac is not None:
        rr = max(1, round(float(r_frac) * p))
        return RankPlan(rr, "r_frac", None, frac(rr))
    if budget is None:
        raise ValueError("bank.budget: set bank.budget, bank.r or bank.r_frac")
    cap = min(p, d)
    r_max = rank_for_budget(budget - kept / N, N, p, d, m, support, banks=banks)
    if frac(1) > budget:
        lo = math.ceil(frac(1) * 1000) / 1000
        raise ValueError(f"bank.budget: {budget:g} cannot be met for {N} experts of {p} x {d} with {banks} bank(s) "
                         f"of m={m} atoms and support {support}{f', {kept} kept uncompressed' if kept else ''} "
                         f"(r = 1 already stores {frac(1):.4f}); the nearest "
                         f"feasible budget is {lo:g} (or lower bank.m_up/m_gate)")
    if r_max > cap and not allow_r_above:
        hi = math.floor(frac(cap) * 1000) / 1000
        raise ValueError(f"bank.budget: {budget:g} is more than GloBE can use for {N} experts of {p} x {d} "
                         f"(r = min(p, d) = {cap} stores {frac(cap):.4f}); the nearest feasible budget is {hi:g} "
                         "(or set bank.allow_r_above=true)")
    rr = r_max
    mult = max(1, int(multiple))
    if rr >= mult:
        rr -= rr % mult
    return RankPlan(rr, "budget", float(budget), frac(rr), (r_max, frac(r_max)))


def fit_rank_plan(cfg: Any, fam: str, N: int, p: int, d: int, layers: int) -> RankPlan:
    """plan_rank for family `fam` of a GlobeConfig (bank.share gives the number of banks)."""
    from .share import n_banks

    b = cfg.bank
    return plan_rank(N, p, d, b.m(fam), cfg.sparsity.target_support, banks=n_banks(b.share, max(1, layers)), r=b.r,
                     r_frac=b.r_frac, budget=b.budget, multiple=b.r_multiple, allow_r_above=b.allow_r_above,
                     kept=kept_count(b.keep_fraction, N))



def fit_rank(cfg: Any, fam: str, N: int, p: int, d: int, layers: int) -> int:
    """The rank r of family `fam` (explicit bank.r / bank.r_frac, else derived from bank.budget)."""
    return fit_rank_plan(cfg, fam, N, p, d, layers).r

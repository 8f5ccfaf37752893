"""Stored-parameter budgets, so baselines are compared at the same size.

Per family with N experts of shape (p, d):
    original         N p d
    GloBE            m r d + N p r + nnz(alpha) + 1 (gain)   [per-expert scales are folded into A]
    per-expert SVD   N k (p + d)
    MoBE-style       L m_l r d + N p r + N m_l               [dense codes, one bank per layer]
"""

from __future__ import annotations


def globe_params(N: int, p: int, d: int, m: int, r: int, nnz: int) -> int:
    return m * r * d + N * p * r + nnz + 1


def rank_for_budget(frac: float, N: int, p: int, d: int, m: int, support: int, r_max: int | None = None) -> int:
    """Largest r with GloBE stored params <= frac * N p d (at least 1)."""
    target = frac * N * p * d - N * support - 1
    r = int(target // (m * d + N * p))
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

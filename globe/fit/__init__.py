"""Fit engine: one global Up/Gate bank per family, sparse entmax codes, closed-form adapters.

    W_i (p, d) ~ s_i * A_i (p, r) @ phi(g * sum_j alpha_ij B_j (r, d)),  alpha_i = sparsemap(z_i / T)

Entry point: `globe.fit.run.run_fit(cfg) -> summary dict`. Building blocks:
`model` (parameters + forward), `solve` (ridge A), `init` (warm start), `temperature` (support control),
`loop` (optimisation), `baselines` (per-expert SVD, MoBE-style bank), `calib` (activation-aware
whitening), `budget` (matched stored-parameter budgets).
"""

from .budget import globe_params, mobe_rank, rank_for_budget, svd_rank
from .loop import FamilyFit, fit_family

__all__ = ["FamilyFit", "fit_family", "globe_params", "mobe_rank", "rank_for_budget", "svd_rank"]

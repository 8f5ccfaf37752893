"""Experts kept uncompressed (`bank.keep_fraction`): chosen, hidden from the fit, accounted for.

Why: routing is uneven. On fixture 2 the busiest 10% of the routed experts carry 60% of the gate mass
sum_t g_ti^2 (the squared routing weight their output is scaled by), so their errors dominate the
output's (benchmarks/bench_keep_dense.py). Keeping them exact and fitting the others at what is left of
the budget lowers the perplexity increase at a matched stored size.

How: the fit sees a kept expert as a zero matrix (scale 0), which it already treats as a dead expert:
A_i = 0, one code, left out of the objective (fit/loop.py). Its weights are never stored in a fit
directory: `Family.kept` lists it, and the runtime, both exports and the evaluation take its gate/up
from the source checkpoint (globe/runtime). Errors are reported over all experts (a kept one
contributes no residual and its whole energy to the norm) and, as `rel_fro_error_fitted`, over the
fitted ones; the stored parameters count p d per kept expert per family. Shapes: W (N, p, d), scales
(N,), spectra sv (N, min(p, d)); `kept` holds global expert ids (layer-major, i = li * E + e).
"""

from __future__ import annotations

import math

import torch

from ..io.checkpoint import Checkpoint
from ..progress import Progress
from .init import inv_scales, quiet, spectra


def keep_busiest(mass: torch.Tensor, count: int) -> list[int]:
    """The `count` experts (global ids, ascending) with the largest gate mass (N,) (ties: the lower id).

    The output error of expert i enters the layer's output scaled by its routing weight g, so its squared
    error by g^2: sum_t g_ti^2 ranks experts by how much of the output's error they would carry. Ranking
    by routed-slot counts instead kept far less of what matters on fixture 2 (bench_keep_dense.py:
    5% kept by counts, perplexity increase 1.125, by gate mass 0.959)."""
    if count <= 0:
        return []
    order = torch.argsort(-mass.double(), stable=True)
    return sorted(int(i) for i in order[:count])


def hide_kept(W, sc: torch.Tensor, kept: list[int], dist=None) -> torch.Tensor:
    """Zero the kept experts' rows of W (N, p, d) (a dist.Shard: this rank's own rows) and their scales
    sc (N,) in place, so the fit treats them as dead experts. Returns their scales (K,) for the errors."""
    idx = torch.tensor(kept, dtype=torch.int64)
    kept_sc = sc[idx].clone()
    own = dist.own(idx) if dist is not None else idx
    if own.numel():
        W[own] = 0.0  # a scalar fill: no (K, p, d) temporary
    sc[idx] = 0.0
    return kept_sc


def restore_kept(W, sc: torch.Tensor, sv: torch.Tensor | None, kept: list[int], kept_sc: torch.Tensor,
                 ck: Checkpoint, fam: str, dist=None, chunk: int = 8) -> torch.Tensor | None:
    """Put the kept experts back into W (this rank's own rows) and sc, for the baselines, which compress
    every expert, and their spectra into sv (N, k) (every rank holds all of sv: each decomposes all K kept
    experts, `chunk` read at a time, instead of a new spectra pass over N). Returns sv (None if None)."""
    E = ck.num_experts
    sc[torch.tensor(kept, dtype=torch.int64)] = kept_sc
    sv = None if sv is None else sv.clone()
    with Progress(len(kept), f"kept {fam} experts: read back for the baselines", "experts",
                  quiet=quiet(len(kept) * ck.p * ck.hidden_size)) as pg:
        for a in range(0, len(kept), chunk):
            ids = torch.tensor(kept[a:a + chunk], dtype=torch.int64)
            rows = torch.stack([ck.expert(ck.moe_layers[i // E], i % E, fam, torch.float32) for i in ids.tolist()])
            own = dist.own(ids) if dist is not None else ids
            if own.numel():
                W[own] = rows[torch.isin(ids, own)].to(W.dtype)
            if sv is not None:
                s = kept_sc[a:a + chunk]
                sv[ids] = spectra(rows * inv_scales(s, s > 0)[:, None, None])[0]
            pg.update(len(ids))
    return sv


ERRORS = ("rel_fro_error", "rel_fro_error_before_prune", "prune_error_cost", "init_rel_fro_error",
          "svd_floor_rank_r")


def account_kept(metrics: dict, kept: list[int], kept_sc: torch.Tensor, sc_fitted: torch.Tensor,
                 stored_params: int) -> dict:
    """The fit's metrics over all experts: each error (measured over the fitted experts, whose scales are
    sc_fitted (N,), kept ones 0) times sqrt(E_fitted / (E_fitted + E_kept)) (energies sum s_i^2 p d; a kept
    expert has no residual); the fitted-only error as `rel_fro_error_fitted`; stored params with the kept
    experts' p d each; dead experts without the kept ones."""
    out = dict(metrics)
    if not kept:
        return out
    e_fit = float(sc_fitted.double().pow(2).sum())
    e_kept = float(kept_sc.double().pow(2).sum())
    f = math.sqrt(e_fit / max(e_fit + e_kept, 1e-300))
    out["rel_fro_error_fitted"] = metrics["rel_fro_error"]
    for k in ERRORS:
        if k in out and isinstance(out[k], float) and math.isfinite(out[k]):
            out[k] = out[k] * f
    out["kept_experts"] = len(kept)
    out["kept_energy_share"] = e_kept / max(e_fit + e_kept, 1e-300)
    out["dead_experts"] = max(0, int(metrics.get("dead_experts", 0)) - len(kept))
    out["stored_params"] = int(stored_params)
    return out

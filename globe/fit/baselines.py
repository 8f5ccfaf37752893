"""Baselines at a matched stored-parameter budget, same data, same code base.

- Per-expert truncated SVD of rank k: the error follows from each expert's spectrum, which the
  warm start already computed (sv (N, min(p, d)) of the RMS-normalised experts, scales (N,)).
- MoBE-style bank (Chen et al. 2025, "Mixture of Basis Experts"), written from the paper's
  description: one bank per MoE layer and family, W_i ~ A_i phi(sum_j alpha_ij B_j) with DENSE
  softmax mixtures alpha_i = softmax(z_i), every parameter (A, B, z) trained jointly by Adam on the
  reconstruction MSE of scale-normalised experts. As a courtesy the final A is refitted in closed
  form (it can only lower the baseline's error). Shapes per layer: B (m_l, r, d), z (E, m_l), A (E, p, r).
  Cost: every Adam step touches all E experts of a layer, so `steps` steps over L layers cost about
  L * E / batch_size times as many expert-updates as the GloBE fit's own steps; that is why
  `globe fit` runs it only with `train.baseline_mobe=true` (the SVD baseline is always free).
Dead experts (init.live_experts) are reconstructed as zero by both baselines, as by GloBE.
"""

from __future__ import annotations

import math

import torch

from ..maps import get_activation
from ..progress import Progress
from .budget import mobe_params
from .init import expert_scales, inv_scales, mean_one, quiet
from .solve import ridge_A


def svd_error(sv: torch.Tensor, scales: torch.Tensor, k: int) -> float:
    """sqrt(sum_i ||W_i - SVD_k(W_i)||^2 / sum_i ||W_i||^2) from normalised spectra."""
    s2 = scales.double().pow(2)
    tail = sv[:, k:].double().pow(2).sum(1)
    return math.sqrt(float((tail * s2).sum() / (sv.double().pow(2).sum(1) * s2).sum()))


def mobe_fit(W: torch.Tensor, layers: int, m_l: int, r: int, *, activation: str = "silu", steps: int = 300,
             lr: float = 1e-2, seed: int = 0, lam: float = 1e-4, dev: str = "cpu", chunk: int = 32,
             return_weights: bool = False, scales: torch.Tensor | None = None, progress: bool | None = None,
             desc: str = "MoBE-style baseline", dist=None, weights: torch.Tensor | None = None) -> dict:
    """Fit one MoBE-style bank per layer to W (N, p, d) (layer-major, N = layers * E).

    dist (globe.fit.dist.Dist, sharded fit): each rank fits the banks of its own layers (W holds only
    their experts; the random stream is advanced past the other layers, so every layer gets the bank
    it gets in one process) and the error is summed over ranks.

    return_weights=True adds "W_hat" (N, p, d) fp32 in the original scale (for perplexity checks).
    scales (N,): the experts' RMS if known. progress: tqdm (True), log lines (False) or auto (None).
    weights (N,) positive: each expert's weight in the loss (the GloBE fit's train.expert_weights, rescaled
    to mean one over the live experts), so both methods can be compared with the same weighting.
    """
    N, p, d = W.shape
    E = N // layers
    s = expert_scales(W) if scales is None else scales.float()
    inv = inv_scales(s)
    dead = inv == 0
    w = None if weights is None else mean_one(weights, ~dead, "MoBE-style baseline")
    phi = get_activation(activation).fn
    gen = torch.Generator().manual_seed(int(seed))
    res = torch.zeros(N, dtype=torch.float64)
    W_hat = torch.empty(N, p, d, dtype=torch.float32) if return_weights else None
    sharded = dist is not None and dist.on
    owned = dist.layers if sharded else range(layers)  # [dist] this rank's layers
    pg = Progress(len(owned) * steps, desc, "steps", bar=progress, quiet=quiet(W.numel()))
    for li in range(layers):
        sl = slice(li * E, (li + 1) * E)
        B0 = torch.randn(m_l, r, d, generator=gen)  # drawn for every layer: the same stream on every rank
        if li not in owned:
            continue
        Wl = (W[sl].float() * inv[sl, None, None]).to(dev)
        B = B0.to(dev).requires_grad_()
        z = torch.zeros(E, m_l, device=dev, requires_grad=True)
        with torch.no_grad():
            M0 = phi((torch.softmax(z, -1) @ B.reshape(m_l, -1)).reshape(E, r, d))
            A = ridge_A(Wl, M0, lam).requires_grad_()
        opt = torch.optim.Adam([B, z, A], lr=lr)
        wl = None if w is None else w[sl].to(dev)[:, None, None]
        for _ in range(steps):
            M = phi((torch.softmax(z, -1) @ B.reshape(m_l, -1)).reshape(E, r, d))
            loss = (Wl - A @ M).pow(2).mean() if wl is None else ((Wl - A @ M).pow(2) * wl).mean()
            if not torch.isfinite(loss):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pg.update(1)
        with torch.no_grad():
            M = phi((torch.softmax(z, -1) @ B.reshape(m_l, -1)).reshape(E, r, d))
            for a in range(0, E, chunk):
                Af = ridge_A(Wl[a:a + chunk], M[a:a + chunk], lam)
                rec = Af @ M[a:a + chunk]
                lo, hi = li * E + a, li * E + a + Af.shape[0]
                res[lo:hi] = (Wl[a:a + chunk] - rec).pow(2).sum(dim=(1, 2)).double().cpu()
                if W_hat is not None:
                    W_hat[lo:hi] = (rec * s[lo:hi, None, None].to(rec)).cpu()
    pg.close()
    res[dead] = float(p * d)  # reconstructed as zero (A = 0): residual = the whole normalised expert
    s2 = s.double().pow(2)
    rel = math.sqrt(float((res * s2).sum() / (s2 * p * d).sum()))
    if sharded:  # [dist] residuals of this rank's experts, summed over ranks
        lo, hi = dist.span
        rel = math.sqrt(dist.sum64([(res[lo:hi] * s2[lo:hi]).sum()])[0] / float((s2 * p * d).sum()))
    out = {"rel_fro_error": rel, "stored_params": mobe_params(N, layers, p, d, m_l, r), "original_params": N * p * d,
           "m_per_layer": m_l, "r": r, "steps": steps}
    if W_hat is not None:
        out["W_hat"] = W_hat
    return out

"""Closed-form adapters: ridge least squares A = W M^T (M M^T + lam I)^-1, batched.

Shapes: W (n, p, d), M (n, r, d) -> A (n, p, r). lam is relative to the mean diagonal of M M^T so
it is scale free. Batched Cholesky; any expert whose Cholesky fails falls back to a general solve
(and a pseudo-inverse if that fails too), so the refit never raises on a singular M.
With a whitening L (d, d) or (n, d, d) the objective is ||(W - A M) L||^2: pass W L and M L.
"""

from __future__ import annotations

import torch


def ridge_A(W: torch.Tensor, M: torch.Tensor, lam: float = 1e-4) -> torch.Tensor:
    """argmin_A ||W - A M||^2 + lam' ||A||^2 per expert; (n,p,d),(n,r,d) -> (n,p,r) fp32."""
    W, M = W.float(), M.float()
    G = M @ M.transpose(1, 2)  # (n, r, r)
    R = W @ M.transpose(1, 2)  # (n, p, r)
    r = G.shape[-1]
    scale = G.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)  # (n,)
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    G = G + (lam * scale + 1e-12 * scale)[:, None, None] * eye
    Lc, info = torch.linalg.cholesky_ex(G)
    out = torch.empty_like(R)
    ok = info == 0
    if ok.any():
        # A G = R  <=>  G A^T = R^T (G symmetric)
        out[ok] = torch.cholesky_solve(R[ok].transpose(1, 2), Lc[ok]).transpose(1, 2)
    bad = (~ok).nonzero().flatten()
    for i in bad.tolist():
        try:
            out[i] = torch.linalg.solve(G[i], R[i].T).T
        except RuntimeError:
            out[i] = R[i] @ torch.linalg.pinv(G[i])
    return out


def residual(W: torch.Tensor, A: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius residual per expert ||W - A M||^2: (n,)."""
    return (W.float() - A @ M).pow(2).sum(dim=(1, 2))

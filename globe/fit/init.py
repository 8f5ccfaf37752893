"""Warm start of one family: scales, truncated SVD, bank seeding, initial codes.

1. Per-expert scalar normalisation s_i = RMS(W_i); the fit sees W_i / s_i, s_i folds into A_i.
2. One pass of truncated SVDs (chunked) gives every expert's spectrum (the rank-r floor and the SVD
   baseline for free) and its proxy row space V_i (r, d).
3. Rotation ambiguity: V_i is only defined up to an r x r rotation (A absorbs it), so raw proxies
   are not comparable. Each V_i is aligned by orthogonal Procrustes to a common reference G (top-r
   right singular vectors of all experts stacked), Q_i = argmin ||Q V_i - G||; aligned proxies
   Q_i V_i are then clustered (k-means, m clusters) into atoms.
4. Initial codes: NNLS of each aligned proxy on the atoms (batched projected gradient), turned
   into logits by standardising (never log(alpha)); the temperature is then calibrated so the
   median support equals the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .temperature import calibrate

KM_ITERS = 25


@dataclass
class WarmStart:
    bank: torch.Tensor  # (m, r, d) unit-RMS atoms
    logits: torch.Tensor  # (N, m)
    T: float
    gain: float
    sv: torch.Tensor  # (N, min(p, d)) singular values of the normalised experts
    scales: torch.Tensor  # (N,)


def expert_scales(W: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """RMS of each expert in fp32: (N,)."""
    out = torch.empty(W.shape[0])
    for a in range(0, W.shape[0], chunk):
        out[a:a + chunk] = W[a:a + chunk].float().pow(2).mean(dim=(1, 2)).sqrt().clamp_min(1e-12)
    return out


def _kmeans(X: torch.Tensor, k: int, gen: torch.Generator, iters: int = KM_ITERS) -> torch.Tensor:
    """Plain k-means++ / Lloyd on rows of X (n, D) -> (k, D) centroids."""
    n = X.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    C = [X[first]]
    d2 = (X - X[first]).pow(2).sum(1)
    for _ in range(1, min(k, n)):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n)
        j = int(torch.multinomial(probs, 1, generator=gen))
        C.append(X[j])
        d2 = torch.minimum(d2, (X - X[j]).pow(2).sum(1))
    C = torch.stack(C)
    xx = X.pow(2).sum(1, keepdim=True)
    for _ in range(iters):
        dist = xx - 2 * X @ C.T + C.pow(2).sum(1)[None]
        lab = dist.argmin(1)
        for j in range(C.shape[0]):
            sel = lab == j
            if sel.any():
                C[j] = X[sel].mean(0)
    return C


def nnls(K: torch.Tensor, b: torch.Tensor, iters: int = 300) -> torch.Tensor:
    """min_{x>=0} 0.5 x^T K x - b^T x for a batch b (n, m), K (m, m) PSD; projected gradient."""
    L = float(torch.linalg.eigvalsh(K).max().clamp_min(1e-12))
    x = torch.zeros_like(b)
    y, t = x.clone(), 1.0
    for _ in range(iters):  # FISTA
        x_new = (y - (y @ K - b) / L).clamp_min(0)
        t_new = 0.5 * (1 + (1 + 4 * t * t) ** 0.5)
        y = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


def warm_start(W: torch.Tensor, scales: torch.Tensor, m: int, r: int, target: int, *, kind: str = "entmax",
               alpha: float = 1.5, gain: float = 1.0, method: str = "svd", seed: int = 0, chunk: int = 32,
               max_cluster: int = 512, mix_w: float = 0.5, T_min: float = 1e-3, T_max: float = 1e3,
               whiten=None) -> WarmStart:
    """Bank (m, r, d), logits (N, m) and T for experts W (N, p, d) (any dtype)."""
    N, p, d = W.shape
    gen = torch.Generator().manual_seed(int(seed))
    k = min(p, d)
    sv = torch.empty(N, k)
    # Common reference: top-r right singular vectors of all experts stacked (eig of sum W^T W).
    gram = torch.zeros(d, d, dtype=torch.float64)
    for a in range(0, N, chunk):
        Wb = _prep(W, scales, a, chunk, whiten)
        gram += torch.einsum("npd,npe->de", Wb, Wb).double()
    evals, evecs = torch.linalg.eigh(gram)
    G = evecs[:, -r:].flip(1).T.float() if r <= d else None  # (r, d)
    if method == "random":
        bank = torch.randn(m, r, d, generator=gen)
    elif method == "kmeans":  # cluster Procrustes-aligned proxies of a subset of experts
        sel = torch.randperm(N, generator=gen)[:max_cluster].sort().values
        P = torch.cat([_align(torch.linalg.svd(_prep_idx(W, scales, sel[a:a + chunk], whiten),
                                               full_matrices=False)[2][:, :r], G, r, d, gen)
                       for a in range(0, len(sel), chunk)])
        C = _kmeans(P.reshape(len(sel), -1), m, gen)
        del P
        if C.shape[0] < m:  # more atoms than proxies: perturbed copies
            extra = C[torch.randint(C.shape[0], (m - C.shape[0],), generator=gen)]
            C = torch.cat([C, extra + 0.5 * extra.std() * torch.randn(extra.shape, generator=gen)])
        bank = C.reshape(m, r, d)
    else:  # svd: random rotations of the common row space G plus random diversity
        Gs = G if G is not None else torch.randn(r, d, generator=gen)
        Gs = Gs / Gs.pow(2).mean().sqrt()
        Q = torch.linalg.qr(torch.randn(m, r, r, generator=gen)).Q  # (m, r, r) random rotations
        bank = mix_w * (Q @ Gs) + (1 - mix_w) * torch.randn(m, r, d, generator=gen)
    bank = bank / bank.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-30)
    Bf = bank.reshape(m, -1)
    b = torch.empty(N, m)
    for a in range(0, N, chunk):  # spectra of every expert + projections of its aligned proxy on the atoms
        Wb = _prep(W, scales, a, chunk, whiten)
        _, S, Vh = torch.linalg.svd(Wb, full_matrices=False)
        sv[a:a + Wb.shape[0]] = S
        b[a:a + Wb.shape[0]] = _align(Vh[:, :r], G, r, d, gen).reshape(Wb.shape[0], -1) @ Bf.T
    codes = nnls(Bf @ Bf.T, b)  # (N, m)
    z = codes - codes.mean(-1, keepdim=True)
    z = z / z.std(-1, keepdim=True, unbiased=False).clamp_min(1e-12)
    z = z + 1e-3 * torch.randn(z.shape, generator=gen)  # break exact ties
    z = z - z.mean(-1, keepdim=True)
    T = calibrate(z, target, kind, alpha, T_min, T_max)
    return WarmStart(bank=bank, logits=z, T=T, gain=float(gain), sv=sv, scales=scales)


def _prep(W, scales, a, chunk, whiten):
    Wb = W[a:a + chunk].float() / scales[a:a + chunk, None, None]
    if whiten is not None:
        Wb = Wb @ whiten(torch.arange(a, a + Wb.shape[0]))
    return Wb


def _prep_idx(W, scales, idx, whiten):
    Wb = W[idx].float() / scales[idx, None, None]
    return Wb @ whiten(idx) if whiten is not None else Wb


def _align(Vh: torch.Tensor, G: torch.Tensor | None, r: int, d: int, gen) -> torch.Tensor:
    """Rotate each proxy (n, r', d) to best match G (r, d); pad if the expert has rank < r."""
    n, rr, _ = Vh.shape
    if rr < r:  # r > min(p, d): pad with random orthogonal-ish rows
        Vh = torch.cat([Vh, torch.randn(n, r - rr, d, generator=gen) / d ** 0.5], 1)
    if G is not None:
        U, _, Xh = torch.linalg.svd(G[None] @ Vh.transpose(1, 2))  # (n, r, r)
        Vh = (U @ Xh) @ Vh
    return Vh / Vh.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-30)

"""Warm start of one family: scales, exact spectra from Gram matrices, bank seeding, initial codes.

1. Per-expert scalar normalisation s_i = RMS(W_i); the fit sees W_i / s_i, s_i folds into A_i.
   Dead experts (all zero, or RMS below DEAD_REL x the family's median RMS: pruned or never trained)
   are fitted as exactly zero (A_i = 0): they are left out of the objective, the bank seeding, the
   temperature control and the support statistics, so they never disturb the live experts.
2. One chunked pass of `spectra` gives every expert's singular values (the rank-r floor and the
   SVD baseline for free) and its proxy row space V_i (r, d), without a full SVD: it eigendecomposes
   the smaller-side Gram matrix K_i = W_i W_i^T (p x p when p <= d), takes sigma_j = ||u_j^T W_i||
   (Rayleigh quotients: partial sums of sigma^2, hence floors and SVD errors, match the SVD's) and
   V_i = the normalised rows u_j^T W_i of the r leading eigenvectors, re-orthonormalised.
   The eigendecompositions, QRs and r x r Procrustes SVDs run one matrix per thread with one
   intra-op thread each (`per_matrix`): MKL's multi-threaded LAPACK spends most of its time in
   OpenMP barriers when the cores are shared with other work (one 1408 x 1408 fp64 eigh: 17.8 s on
   2 threads vs 1.4 s on 1 thread at load average 9.7 on this 2-core machine). Costs per expert at
   the Qwen1.5-MoE-A2.7B shape: benchmarks/bench_warm_start.py.
3. Rotation ambiguity: V_i is only defined up to an r x r rotation (A absorbs it), so raw proxies
   are not comparable. Each V_i is aligned by orthogonal Procrustes to a common reference G (top-r
   right singular vectors of all experts stacked), Q_i = argmin ||Q V_i - G|| (one r x r SVD per
   expert); the aligned proxy Q_i V_i = (G P_i G^T)^(-1/2) G P_i depends only on the projector
   P_i = V_i^T V_i, so any orthonormal basis of the same subspace gives the same result.
   `kmeans` clusters aligned proxies into atoms; `svd` seeds atoms as random rotations of G.
4. Initial codes: NNLS of each aligned proxy on the atoms (batched projected gradient), turned
   into logits by standardising (never log(alpha)); the temperature is then calibrated so the
   median support (of the live experts) equals the target.
Shapes: W (N, p, d) any float dtype; bank (m, r, d); logits (N, m); sv (N, min(p, d)).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..errors import GlobeError
from ..progress import Progress
from .temperature import calibrate

KM_ITERS = 25
DEAD_REL = 1e-4  # RMS below this fraction of the family's median RMS: a dead expert (energy < 1e-8 of a peer)
NULL_REL = 1e-5  # singular values below this fraction of sigma_1 are not resolved by the fp32 Gram
QUIET_NUMEL = 2e7  # phases over fewer weight elements than this take a few seconds at most: no progress lines


def quiet(numel: float) -> bool:
    """True when a pass over `numel` weight elements is too short to need progress lines."""
    return float(numel) < QUIET_NUMEL


@dataclass
class WarmStart:
    bank: torch.Tensor  # (m, r, d) unit-RMS atoms
    logits: torch.Tensor  # (N, m)
    T: float
    gain: float
    sv: torch.Tensor  # (N, min(p, d)) singular values of the normalised experts
    scales: torch.Tensor  # (N,)


def expert_scales(W: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """RMS of each expert: (N,) fp32; exactly 0 for an all-zero expert, NaN/inf if it holds NaN/inf.

    Computed as max|W| * RMS(W / max|W|), so tiny (subnormal) and huge entries neither underflow nor
    overflow when squared.
    """
    out = torch.empty(W.shape[0])
    for a in range(0, W.shape[0], chunk):
        x = W[a:a + chunk].float()
        amax = x.abs().amax(dim=(1, 2))
        ok = (amax > 0) & torch.isfinite(amax)
        div = torch.where(ok, amax, torch.ones_like(amax))
        out[a:a + chunk] = torch.where(amax == 0, amax, amax * (x / div[:, None, None]).pow(2).mean(dim=(1, 2)).sqrt())
    return out


def check_finite(s: torch.Tensor, what: str = "expert") -> None:
    """GlobeError naming the first expert whose scale (RMS) is NaN/inf, i.e. that holds NaN/inf weights."""
    bad = (~torch.isfinite(s)).nonzero().flatten()
    if len(bad):
        raise GlobeError(f"{what} {int(bad[0])} holds non-finite weights (NaN/inf)"
                         + (f" ({len(bad)} experts affected)" if len(bad) > 1 else ""))


def live_experts(s: torch.Tensor) -> torch.Tensor:
    """(N,) bool: experts with RMS > 0 and above DEAD_REL x the median RMS (the others are fitted as zero)."""
    med = s.median() if s.numel() else s.new_zeros(())
    return (s > 0) & (s > DEAD_REL * med)


def mean_one(weights, live: torch.Tensor, where: str) -> torch.Tensor:
    """Expert weights (N,) -> fp32, rescaled to mean one over the live experts (N,) bool; GlobeError naming
    `where` unless they are N positive finite numbers. Huge weights (their fp32 mean overflows) are scaled
    by the largest first, so they are never turned into zeros."""
    N = live.numel()
    w = torch.as_tensor(weights).detach().float().cpu()
    if w.shape != (N,) or not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
        raise GlobeError(f"{where}: expert weights must be {N} positive finite numbers, shape ({N},)")
    if not bool(live.any()):
        return w
    mean = w[live].mean()
    if not bool(torch.isfinite(mean)):
        w = w / w.max()
        mean = w[live].mean()
    return w / mean


def inv_scales(s: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
    """1 / s_i for live experts, 0 for dead ones (their normalised weights become exactly zero)."""
    live = live_experts(s) if live is None else live
    return torch.where(live, 1.0 / torch.where(live, s, torch.ones_like(s)), torch.zeros_like(s))


def per_matrix(fn: Callable, batch: torch.Tensor) -> list:
    """[fn(batch[i]) for i] with ONE intra-op thread per call, calls spread over torch.get_num_threads()
    Python threads (torch releases the GIL): no OpenMP barriers inside LAPACK, all cores busy.

    Each worker sets its own thread count: the OpenMP setting is per thread, and a worker left at the
    process default sometimes ran LAPACK with 2 threads and sometimes with 1, which changes the rounding
    (measured: 2 of 16 runs of the same fit gave a different gate family; tests/test_fit_warmstart.py)."""
    n = torch.get_num_threads()
    if n == 1 or batch.device.type != "cpu":
        return [fn(x) for x in batch]
    torch.set_num_threads(1)

    def one(x: torch.Tensor):
        torch.set_num_threads(1)
        return fn(x)

    try:
        if batch.shape[0] == 1:
            return [fn(batch[0])]
        with ThreadPoolExecutor(min(n, batch.shape[0])) as ex:
            return list(ex.map(one, batch))
    finally:
        torch.set_num_threads(n)


def spectra(X: torch.Tensor, r: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Singular values and top-r right singular subspace of each matrix, without a full SVD.

    X (n, p, d) float. Returns sv (n, k) fp32 in descending order, k = min(p, d), and, if r is given,
    V (n, min(r, k), d) fp32 whose rows (orthonormal) span each matrix's top-r right singular subspace
    (a rotation of the SVD's Vh[:, :r] when sigma_r > sigma_{r+1}).
    Method (fp32 throughout): the Gram matrix of the smaller side, K = X X^T (p <= d; else X^T X), its
    eigenvectors U (`torch.linalg.eigh`, one matrix per thread, `per_matrix`), Z = U^T X (k, d) and
    sigma_i = ||Z_i|| (a Rayleigh quotient: the tail keeps the matrix's energy exactly, unlike
    sqrt(lambda_i), so rank-r floors and rank-k SVD errors match the SVD's to ~1e-8 of the energy;
    single values to ~3e-5 sigma_1 where the spectrum spans decades, benchmarks/bench_warm_start.py);
    V = rows Z_i / sigma_i of the r leading eigenvectors, re-orthonormalised (QR). Rows whose sigma is
    below NULL_REL x sigma_1 (rank-deficient or zero matrices) are completed with an orthonormal basis
    of the rest of R^d, as an SVD would complete them.
    """
    n, p, d = X.shape
    k = min(p, d)
    X = X.float()
    Xt = X if p <= d else X.transpose(1, 2)  # (n, k, D): the smaller side first
    K = Xt @ Xt.transpose(1, 2)  # (n, k, k)
    eig = per_matrix(torch.linalg.eigh, K)
    del K
    U = torch.stack([e[1] for e in eig]).flip(-1)  # (n, k, k), columns by descending eigenvalue
    del eig
    Z = U.transpose(1, 2) @ Xt  # (n, k, D): row i = u_i^T X
    s_all = torch.linalg.vector_norm(Z, dim=-1, dtype=torch.float64)  # (n, k)
    sv = s_all.sort(-1, descending=True).values.float()
    if r is None:
        return sv, None
    rr = min(r, k)
    if p > d:  # the eigenvectors themselves are the right singular vectors
        return sv, U[..., :rr].transpose(1, 2).contiguous()
    st = s_all[:, :rr]
    ok = st > NULL_REL * sv[:, :1].double()
    V = Z[:, :rr] / torch.where(ok, st, torch.ones_like(st)).float()[..., None]  # (n, rr, d)
    V = torch.stack(per_matrix(lambda v: torch.linalg.qr(v.T).Q.T, V)) * torch.where(ok, 1.0, 0.0)[..., None]
    for i in (~ok).any(1).nonzero().flatten().tolist():  # rare: rank below r
        V[i] = _complete(V[i], ok[i])
    return sv, V


def _complete(V: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Replace rows ~ok of V (rr, d) by an orthonormal basis orthogonal to the rows ok (deterministic)."""
    good = V[ok]
    Z = torch.randn(int((~ok).sum()), V.shape[1], generator=torch.Generator().manual_seed(0), dtype=V.dtype)
    for _ in range(2):  # project out the good rows twice (re-orthogonalisation)
        Z = Z - (Z @ good.T) @ good
    out = V.clone()
    out[~ok] = torch.linalg.qr(Z.T).Q.T
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
    L = float(per_matrix(torch.linalg.eigvalsh, K[None])[0].max().clamp_min(1e-12))
    x = torch.zeros_like(b)
    y, t = x.clone(), 1.0
    for _ in range(iters):  # FISTA
        x_new = (y - (y @ K - b) / L).clamp_min(0)
        t_new = 0.5 * (1 + (1 + 4 * t * t) ** 0.5)
        y = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


def warm_start(W: torch.Tensor, scales: torch.Tensor, m: int, r: int, target: int, *, kind: str = "entmax",
               alpha: float = 1.5, gain: float = 1.0, method: str = "svd", seed: int = 0, chunk: int = 8,
               max_cluster: int = 512, mix_w: float = 0.5, T_min: float = 1e-3, T_max: float = 1e3,
               whiten=None, progress: bool | None = None, name: str = "", dist=None) -> WarmStart:
    """Bank (m, r, d), logits (N, m) and T for experts W (N, p, d) (any dtype).

    dist (globe.fit.dist.Dist, sharded fit): W holds this rank's experts [lo, hi) only; the Gram of all
    experts is summed over ranks, proxies for k-means, spectra and code projections are gathered, so
    every rank gets the same bank, logits, T and spectra (those of one process, up to the Gram's sum
    order; with r > min(p, d) the proxies' random padding rows differ from one process's).

    progress: tqdm bar (True), log lines with rate and ETA (False) or auto (None); `name` labels them.
    Cost per expert: one d x d Gram update, one eigendecomposition of the smaller-side Gram matrix
    (`spectra`), one r x r SVD (Procrustes). Peak extra memory: a few (chunk, p, d) fp32 buffers.
    """
    N, p, d = W.shape
    gen = torch.Generator().manual_seed(int(seed))
    sharded = dist is not None and dist.on
    lo, hi = dist.span if sharded else (0, N)  # [dist] the experts this rank holds
    pad = torch.Generator().manual_seed(int(seed) + 1 + dist.rank) if sharded else gen  # keeps gen in step
    k = min(p, d)
    sv = torch.empty(N, k)
    live = live_experts(scales)
    inv = inv_scales(scales, scales > 0)  # near-zero dead experts keep their own spectrum (exact SVD baseline)
    q = quiet(N * p * d)
    tag = f"warm start {name}".rstrip()
    # Common reference: top-r right singular vectors of all live experts stacked (eig of sum W^T W).
    gram = torch.zeros(d, d, dtype=torch.float64)
    with Progress(hi - lo, f"{tag}: common row space", "experts", bar=progress, quiet=q) as pg:
        for a in range(lo, hi, chunk):
            Wb = _prep(W, inv, torch.arange(a, min(hi, a + chunk)), whiten) * live[a:min(hi, a + chunk), None, None]
            gram += torch.einsum("npd,npe->de", Wb, Wb).double()
            pg.update(Wb.shape[0])
    if sharded:
        dist.all_reduce_(gram)
    evals, evecs = per_matrix(torch.linalg.eigh, gram[None])[0]
    G = evecs[:, -r:].flip(1).T.float() if r <= d else None  # (r, d)
    if method == "random":
        bank = torch.randn(m, r, d, generator=gen)
    elif method == "kmeans":  # cluster Procrustes-aligned proxies of a subset of live experts
        pool = live.nonzero().flatten()
        sel = pool[torch.randperm(len(pool), generator=gen)[:max_cluster]].sort().values
        mine = sel[(sel >= lo) & (sel < hi)]  # [dist] proxies of this rank's experts, gathered in sel order
        P = torch.cat([_align(spectra(_prep(W, inv, mine[a:a + chunk], whiten), r)[1], G, r, d, pad)
                       for a in range(0, len(mine), chunk)] or [torch.zeros(0, r, d)])
        if sharded:
            P = dist.gather_var(P)
        C = _kmeans(P.reshape(len(sel), -1), m, gen)
        del P
        if C.shape[0] < m:  # more atoms than proxies: perturbed copies
            extra = C[torch.randint(C.shape[0], (m - C.shape[0],), generator=gen)]
            C = torch.cat([C, extra + 0.5 * extra.std() * torch.randn(extra.shape, generator=gen)])
        bank = C.reshape(m, r, d)
    else:  # svd: random rotations of the common row space G plus random diversity
        Gs = G if G is not None else torch.randn(r, d, generator=gen)
        Gs = Gs / Gs.pow(2).mean().sqrt().clamp_min(1e-30)
        Q = torch.stack([q.Q for q in per_matrix(torch.linalg.qr, torch.randn(m, r, r, generator=gen))])  # rotations
        bank = mix_w * (Q @ Gs) + (1 - mix_w) * torch.randn(m, r, d, generator=gen)
    bank = bank / bank.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-30)
    if sharded:  # [dist] the same bank everywhere even if LAPACK differs between hosts (bitwise no-op otherwise)
        dist.broadcast_(bank)
    Bf = bank.reshape(m, -1)
    b = torch.zeros(N, m)
    with Progress(hi - lo, f"{tag}: spectra and proxies", "experts", bar=progress, quiet=q) as pg:
        for a in range(lo, hi, chunk):  # spectra of every expert + projections of its aligned proxy on the atoms
            idx = torch.arange(a, min(hi, a + chunk))
            S, V = spectra(_prep(W, inv, idx, whiten), r)
            sv[idx] = S
            b[idx] = _align(V, G, r, d, pad).reshape(len(idx), -1) @ Bf.T * live[idx, None]
            pg.update(len(idx))
    if sharded:  # [dist] every rank gets all spectra and projections (N x min(p, d) and N x m floats)
        sv, b = dist.gather_rows(sv[lo:hi]), dist.gather_rows(b[lo:hi])
    codes = nnls(Bf @ Bf.T, b)  # (N, m); dead experts: b = 0 -> codes 0 -> uniform logits
    z = codes - codes.mean(-1, keepdim=True)
    z = z / z.std(-1, keepdim=True, unbiased=False).clamp_min(1e-12)
    z = z + 1e-3 * torch.randn(z.shape, generator=gen)  # break exact ties
    z = z - z.mean(-1, keepdim=True)
    T = calibrate(z[live] if live.any() else z, target, kind, alpha, T_min, T_max)
    if sharded:
        dist.broadcast_(z)
        T = dist.broadcast(T)
    return WarmStart(bank=bank, logits=z, T=T, gain=float(gain), sv=sv, scales=scales)


def _prep(W, inv, idx, whiten):
    """Normalised (and whitened) experts idx: (n, p, d) fp32; only exact zeros for s_i = 0."""
    Wb = W[idx].float() * inv[idx, None, None]
    return Wb @ whiten(idx) if whiten is not None else Wb


def _align(Vh: torch.Tensor, G: torch.Tensor | None, r: int, d: int, gen) -> torch.Tensor:
    """Rotate each proxy (n, r', d) to best match G (r, d); pad if the expert has rank < r."""
    n, rr, _ = Vh.shape
    if rr < r:  # r > min(p, d): pad with random orthogonal-ish rows
        Vh = torch.cat([Vh, torch.randn(n, r - rr, d, generator=gen) / d ** 0.5], 1)
    if G is not None:
        Q = torch.stack([u @ xh for u, _, xh in per_matrix(torch.linalg.svd, G[None] @ Vh.transpose(1, 2))])
        Vh = Q @ Vh  # (n, r, r) @ (n, r, d)
    return Vh / Vh.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-30)

"""Fast warm start: the Gram-eigendecomposition spectra equal a full SVD's (values, rank-r floor, SVD
baseline at rank k, top-r subspaces up to rotation), including rank-deficient, zero and r > min(p, d)."""

from __future__ import annotations

import math

import pytest
import torch

from globe.fit.baselines import svd_error
from globe.fit.init import _align, expert_scales, inv_scales, spectra, warm_start


def experts(p: int, d: int, seed: int = 0, decades: float = 2.0) -> torch.Tensor:
    """A batch with a decaying spectrum, a rank-3 expert, a zero expert and a tiny-scale expert."""
    g = torch.Generator().manual_seed(seed)
    k = min(p, d)
    U = torch.linalg.qr(torch.randn(4, p, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(4, d, k, generator=g)).Q
    S = torch.logspace(0, -decades, k)[None].repeat(4, 1) * (1 + 0.1 * torch.rand(4, k, generator=g))
    W = U @ torch.diag_embed(S) @ V.transpose(1, 2)
    W[1] = torch.randn(p, 3, generator=g) @ torch.randn(3, d, generator=g)  # rank 3
    W[2] = 0.0
    W[3] *= 1e-20  # tiny but not zero: same spectrum shape at another scale
    return W


def projector(V: torch.Tensor) -> torch.Tensor:
    return V.transpose(-1, -2) @ V


@pytest.mark.parametrize("p,d", [(24, 40), (40, 24), (30, 30)])
@pytest.mark.parametrize("r", [5, 23, 30, 45])
def test_spectra_match_full_svd(p, d, r):
    W = experts(p, d)
    s = expert_scales(W)
    X = W * inv_scales(s, s > 0)[:, None, None]
    sv, V = spectra(X, r)
    ref_U, ref_S, ref_Vh = torch.linalg.svd(X.double(), full_matrices=False)
    k = min(p, d)
    assert sv.shape == (4, k) and V.shape == (4, min(r, k), d)
    # single values to 2e-4 sigma_1 (fp32 Gram; the smallest of a 3-decade spectrum are the least exact) ...
    torch.testing.assert_close(sv.double(), ref_S, atol=2e-4 * float(ref_S.max()), rtol=0)
    # rows of V are orthonormal, also for the rank-3 and the zero expert (completed like an SVD would)
    torch.testing.assert_close(V @ V.transpose(1, 2), torch.eye(min(r, k)).expand(4, -1, -1), atol=1e-5, rtol=0)
    # the top-r subspace equals the SVD's up to the fp32 Gram's resolution (Davis-Kahan: perturbation of
    # K ~ k eps32 sigma_1^2 over the gap sigma_r^2 - sigma_{r+1}^2) for the full-rank experts ...
    rr = min(r, k)
    for i in (0, 3):
        S2 = ref_S[i].pow(2)
        tol = 1e-5 if rr == k else 1e-5 + k * 1.2e-7 * float(S2[0] / (S2[rr - 1] - S2[rr]))
        assert tol < 0.1  # never vacuous
        torch.testing.assert_close(projector(V[i]).double(), projector(ref_Vh[i, :rr]), atol=tol, rtol=0)
    # ... and the rank-3 expert's row space lies inside its proxy space
    R3 = ref_Vh[1, :3]
    torch.testing.assert_close((R3 @ projector(V[1]).double()), R3, atol=1e-5, rtol=0)
    # ... but partial sums of sigma^2 are exact: rank-r floor and SVD baseline at rank k as from the SVD
    for rank in (1, 3, rr, k):
        assert svd_error(sv, s, rank) == pytest.approx(svd_error(ref_S.float(), s, rank), abs=1e-6)
    # singular values only (no vectors) agree as well
    torch.testing.assert_close(spectra(X)[0], sv, atol=0, rtol=0)


@pytest.mark.parametrize("decades", [3.0, 5.0])
def test_floors_exact_for_wide_spectra(decades):
    """Spectra spanning many decades: single tail values are the least exact in fp32, energies are not."""
    W = experts(48, 64, seed=4, decades=decades)
    s = expert_scales(W)
    X = W * inv_scales(s, s > 0)[:, None, None]
    sv, V = spectra(X, 30)
    ref = torch.linalg.svdvals(X.double())
    for rank in range(0, 49, 6):  # errors agree to 5e-6 absolute (relative energy 2.5e-11, the fp32 noise floor)
        assert svd_error(sv, s, rank) == pytest.approx(svd_error(ref.float(), s, rank), abs=5e-6)
    torch.testing.assert_close(V @ V.transpose(1, 2), torch.eye(30).expand(4, -1, -1), atol=1e-5, rtol=0)


def test_aligned_proxies_equal_those_from_the_svd():
    """Procrustes alignment makes the proxy independent of the basis: same result from spectra and SVD."""
    W = experts(24, 40, seed=1)[[0, 3]]
    X = W / expert_scales(W)[:, None, None]
    r, d = 6, 40
    G = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(2))).Q.T
    _, V = spectra(X, r)
    Vh = torch.linalg.svd(X, full_matrices=False)[2][:, :r]
    g = torch.Generator()
    torch.testing.assert_close(_align(V, G, r, d, g), _align(Vh, G, r, d, g), atol=1e-4, rtol=0)


def test_warm_start_spectra_and_codes_with_dead_experts():
    """sv of warm_start = SVD of the normalised experts; a zero expert gets uniform logits and no say in T."""
    g = torch.Generator().manual_seed(3)
    N, p, d = 16, 12, 20
    W = torch.randn(N, p, d, generator=g) * torch.rand(N, 1, 1, generator=g)
    W[5] = 0.0
    s = expert_scales(W)
    ws = warm_start(W, s, m=6, r=4, target=3, seed=0, progress=False)
    ref = torch.linalg.svdvals(W * inv_scales(s, s > 0)[:, None, None])
    torch.testing.assert_close(ws.sv, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(ws.logits).all() and math.isfinite(ws.T)
    W2 = W.clone()
    W2[5] = 1e-30 * torch.randn(p, d, generator=g)  # near zero: same treatment as zero
    ws2 = warm_start(W2, expert_scales(W2), m=6, r=4, target=3, seed=0, progress=False)
    assert ws2.T == ws.T
    keep = torch.arange(N) != 5
    torch.testing.assert_close(ws2.logits[keep], ws.logits[keep])
    torch.testing.assert_close(ws2.bank, ws.bank)


def test_per_matrix_runs_each_call_on_one_thread():
    """per_matrix's workers must run LAPACK with ONE thread, exactly as a 1-thread loop does. A worker left
    at the process's OpenMP default sometimes used 2 threads and sometimes 1 (different rounding), so the
    same fit with the same seed gave a different gate family in 2 of 16 runs."""
    from globe.fit.init import per_matrix

    V = torch.randn(16, 44, 128, generator=torch.Generator().manual_seed(0))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = torch.stack(per_matrix(lambda v: torch.linalg.qr(v.T).Q.T, V))
        torch.set_num_threads(1)
        want = torch.stack([torch.linalg.qr(v.T).Q.T for v in V])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(got, want)

"""Warm start cost per expert at the real Qwen1.5-MoE-A2.7B shape (p=1408, d=2048, r=704, m=128).

Compares, in the same process and interleaved per round (ratios survive a busy shared machine):
  svd     the previous per-expert work: batched torch.linalg.svd of the normalised experts, Procrustes
          alignment of Vh[:, :r] (batched r x r SVDs), projection on the atoms (reference copy below);
  svd_1t  the same SVDs run one matrix per thread with one intra-op thread each (`init.per_matrix`),
          to separate the threading effect from the change of method;
  gram    what warm_start runs now: `init.spectra` (fp64 eigendecomposition of the p x p Gram matrix,
          one matrix per thread), `init._align`, projection.
Also timed: the common-row-space pass (d x d Gram update per expert), the whole `warm_start` on the
loaded experts, and the N-dependent tail at the full N (NNLS on (N, m) projections, temperature
calibration). Full-family figures are EXTRAPOLATED linearly from the per-expert costs to N = 1440
(24 layers x 60 experts) and labelled so; accuracy of the new spectra against the SVD is recorded.

    python benchmarks/bench_warm_start.py [--experts 8] [--rounds 3] [--threads 2] [--out FILE]
Writes benchmarks/results/warm_start_cpu.json (or --out). warm_start_cpu_loaded.json is the same command
run while other jobs shared the 2 cores (load average recorded in the file).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch
from usage import Parser, cpu_name

from globe.fit.init import _align, expert_scales, inv_scales, nnls, per_matrix, spectra, warm_start
from globe.fit.temperature import calibrate


def old_align(Vh: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Reference copy of the previous `_align` (batched r x r SVD, all threads inside LAPACK)."""
    U, _, Xh = torch.linalg.svd(G[None] @ Vh.transpose(1, 2))
    Vh = (U @ Xh) @ Vh
    return Vh / Vh.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-30)


def old_per_expert(X: torch.Tensor, G: torch.Tensor, Bf: torch.Tensor, r: int, gen) -> torch.Tensor:
    """Reference: the per-expert work of the previous warm start (full SVD of every expert)."""
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return old_align(Vh[:, :r], G).reshape(X.shape[0], -1) @ Bf.T


def svd_1t_per_expert(X: torch.Tensor, G: torch.Tensor, Bf: torch.Tensor, r: int, gen) -> torch.Tensor:
    Vh = torch.stack([v[:r] for _, _, v in per_matrix(lambda x: torch.linalg.svd(x, full_matrices=False), X)])
    return _align(Vh, G, r, X.shape[-1], gen).reshape(X.shape[0], -1) @ Bf.T


def new_per_expert(X: torch.Tensor, G: torch.Tensor, Bf: torch.Tensor, r: int, gen) -> torch.Tensor:
    _, V = spectra(X, r)
    return _align(V, G, r, X.shape[-1], gen).reshape(X.shape[0], -1) @ Bf.T


def main() -> None:
    ap = Parser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--p", type=int, default=1408)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--r", type=int, default=704)
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--N_full", type=int, default=1440)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "warm_start_cpu.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    n, p, d, r, m = a.experts, a.p, a.d, a.r, a.m
    # random experts with a decaying spectrum (as trained weights have), stored in bf16 like the fit keeps them
    k = min(p, d)
    W = torch.empty(n, p, d, dtype=torch.bfloat16)
    for i in range(n):
        U = torch.linalg.qr(torch.randn(p, k, generator=g)).Q
        V = torch.linalg.qr(torch.randn(d, k, generator=g)).Q
        W[i] = (U * torch.logspace(0, -2, k)) @ V.T
    s = expert_scales(W)
    X = (W.float() * inv_scales(s)[:, None, None])[:a.chunk]
    G = torch.linalg.qr(torch.randn(d, r, generator=g)).Q.T.contiguous()
    Bf = torch.randn(m, r * d, generator=g)
    load = [os.getloadavg()[0]]
    # accuracy of the new spectra at the real shape
    sv_new, V_new = spectra(X[:1], r)
    _, S_ref, Vh_ref = torch.linalg.svd(X[:1], full_matrices=False)
    P_diff = float((V_new[0].T @ V_new[0] - Vh_ref[0, :r].T @ Vh_ref[0, :r]).abs().max())
    acc = {"max_abs_sv_diff_over_sigma1": float((sv_new - S_ref).abs().max() / S_ref.max()),
           "max_abs_projector_diff": P_diff,
           "aligned_proxy_projection_max_rel_diff": None}
    bo, bn = old_per_expert(X[:1], G, Bf, r, g), new_per_expert(X[:1], G, Bf, r, g)
    acc["aligned_proxy_projection_max_rel_diff"] = float((bo - bn).abs().max() / bo.abs().max())
    rounds = []
    for _ in range(a.rounds):
        row = {}
        for name, fn in (("svd", old_per_expert), ("svd_1t", svd_1t_per_expert), ("gram", new_per_expert)):
            t = time.perf_counter()
            fn(X, G, Bf, r, g)
            row[name] = (time.perf_counter() - t) / X.shape[0]
        t = time.perf_counter()
        torch.einsum("npd,npe->de", X, X).double()
        row["row_space_pass"] = (time.perf_counter() - t) / X.shape[0]
        row["ratio_svd_over_gram"] = row["svd"] / row["gram"]
        row["ratio_svd_1t_over_gram"] = row["svd_1t"] / row["gram"]
        rounds.append(row)
        print(json.dumps(row), flush=True)
    load.append(os.getloadavg()[0])
    med = {key: sorted(x[key] for x in rounds)[len(rounds) // 2] for key in rounds[0]}
    # the whole warm_start on the loaded experts (includes the N-independent bank construction)
    t = time.perf_counter()
    warm_start(W, s, m, r, 12, seed=0, chunk=a.chunk, progress=False)
    whole = time.perf_counter() - t
    per_expert_new = med["gram"] + med["row_space_pass"]
    fixed = max(0.0, whole - n * per_expert_new)
    # N-dependent tail at the full N: NNLS on (N, m) projections and the temperature calibration
    bfull = torch.randn(a.N_full, m, generator=g).abs()
    K = Bf[:, :r * 64] @ Bf[:, :r * 64].T / 64
    t = time.perf_counter()
    z = nnls(K, bfull)
    z = (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True).clamp_min(1e-12)
    calibrate(z, 12, "entmax", 1.5)
    tail = time.perf_counter() - t
    load.append(os.getloadavg()[0])
    N = a.N_full
    out = {
        "shape": {"p": p, "d": d, "r": r, "m": m, "experts_loaded": n, "chunk": a.chunk, "N_full": N},
        "threads": a.threads, "cpu": cpu_name(), "torch": torch.__version__,
        "loadavg_1min_start_mid_end": load,
        "rounds": rounds, "median_s_per_expert": med,
        "accuracy_vs_full_svd": acc,
        "measured_warm_start_s_for_loaded_experts": whole,
        "fixed_cost_s": fixed, "nnls_and_calibration_s_at_N_full": tail,
        "extrapolated_family_s": {
            "gram (now)": fixed + tail + N * per_expert_new,
            "svd (before)": fixed + tail + N * (med["svd"] + med["row_space_pass"]),
            "svd_1t": fixed + tail + N * (med["svd_1t"] + med["row_space_pass"]),
            "note": "EXTRAPOLATED: fixed cost + NNLS/calibration at N_full + N_full x measured per-expert cost",
        },
        "target_s": 15 * 60,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    out["target_met"] = out["extrapolated_family_s"]["gram (now)"] <= out["target_s"]
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Matplotlib (Agg) figures for `globe report`. Each function writes one PNG and returns its path.

Why separate from report.py: plotting code is long and boring; the report only decides what to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"up": "tab:blue", "gate": "tab:orange"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def error_per_layer(fams: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(fams), 1)
    for k, (f, st) in enumerate(fams.items()):
        layers = list(st["per_layer"])
        xs = [i + k * width for i in range(len(layers))]
        ax.bar(xs, [st["per_layer"][L] for L in layers], width, label=f, color=COLORS.get(f))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], layers)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("relative Frobenius error")
    ax.legend()
    return _save(fig, path)


def error_per_expert(fams: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for f, st in fams.items():
        ax.hist(st["_per_expert"], bins=30, alpha=0.6, label=f, color=COLORS.get(f))
    ax.set_xlabel("relative Frobenius error per expert")
    ax.set_ylabel("experts")
    ax.legend()
    return _save(fig, path)


def spectra(fams: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.5), squeeze=False)
    for ax, (f, st) in zip(axes[0], fams.items()):
        sp = st["spectra"]
        for j, (i, so, sr) in enumerate(zip(sp["experts"], sp["orig"], sp["recon"])):
            c = f"C{j}"
            ax.semilogy(so, color=c, label=f"expert {i} orig")
            ax.semilogy(sr, color=c, ls="--", label=f"expert {i} GloBE")
        top = max((max(so) for so in sp["orig"]), default=1.0)
        lo = min((min(so) for so in sp["orig"]), default=top)
        ax.set_ylim(bottom=max(min(lo, 1e-2 * top) * 0.5, 1e-4 * top))  # hide the rank-r fp noise floor
        ax.set_title(f"{f}: singular values")
        ax.set_xlabel("index")
        ax.legend(fontsize=7)
    return _save(fig, path)


def effective_rank(fams: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    hi = 1
    for f, st in fams.items():
        er = st["effective_rank"]
        ax.scatter(er["orig"], er["recon"], s=12, label=f, color=COLORS.get(f))
        hi = max(hi, *er["orig"], *er["recon"])
    ax.plot([0, hi], [0, hi], "k:", lw=1)
    ax.set_xlabel(f"effective rank, original ({int(100 * fams[next(iter(fams))]['effective_rank']['energy'])}%)")
    ax.set_ylabel("effective rank, GloBE")
    ax.legend()
    return _save(fig, path)


def support_hist(fams: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(fams), 1)
    for k, (f, st) in enumerate(fams.items()):
        h = st["support_hist"]
        ax.bar([int(s) + k * width for s in h], list(h.values()), width, label=f, color=COLORS.get(f))
    ax.set_xlabel("support size nnz(alpha_i)")
    ax.set_ylabel("experts")
    ax.legend()
    return _save(fig, path)


def atom_popularity(fams: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.5), squeeze=False)
    for ax, (f, st) in zip(axes[0], fams.items()):
        pop = sorted(st["atom_popularity"], reverse=True)
        ax.bar(range(len(pop)), pop, color=COLORS.get(f))
        ax.set_title(f"{f}: experts per atom ({st['unused_atoms']} unused)")
        ax.set_xlabel("atom (sorted)")
    return _save(fig, path)


def coherence(fams: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(fams), figsize=(4.5 * len(fams), 4), squeeze=False)
    for ax, (f, st) in zip(axes[0], fams.items()):
        im = ax.imshow(st["_coherence"].numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{f}: |cos(B_i, B_j)| (max off-diag {st['coherence_max']:.2f})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def trajectories(traj: dict[str, dict[str, list]], keys: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for fam, series in traj.items():
            for name, pts in series.items():
                if name == key:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=fam, color=COLORS.get(fam))
        ax.set_title(key)
        ax.set_xlabel("step")
        if key.lower().startswith(("t", "temp", "loss", "rel")):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    return _save(fig, path)


def hit_rate(curves: dict[str, dict[str, float]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, c in curves.items():
        S = sorted(c, key=int)
        ax.plot([int(s) for s in S], [c[s] for s in S], "o-", label=label)
    ax.set_xlabel("cache size S per layer")
    ax.set_ylabel("LRU hit rate")
    ax.set_ylim(0, 1.02)
    ax.legend()
    return _save(fig, path)


def pareto(points: list[dict[str, Any]], y_key: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    pts = sorted(points, key=lambda p: p["stored_params"])
    ax.scatter([p["stored_params"] for p in pts], [p[y_key] for p in pts], s=18)
    for p in pts:
        ax.annotate(p["label"], (p["stored_params"], p[y_key]), fontsize=6)
    front, best = [], float("inf")
    for p in pts:
        if p[y_key] < best:
            front.append(p)
            best = p[y_key]
    ax.plot([p["stored_params"] for p in front], [p[y_key] for p in front], "r-", lw=1, label="Pareto front")
    ax.set_xlabel("stored params (routed up + gate)")
    ax.set_ylabel(y_key)
    ax.legend()
    return _save(fig, path)

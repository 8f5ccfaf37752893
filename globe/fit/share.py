"""Bank sharing scope: which MoE layers share one bank (`bank.share = global | layer | group:K`).

Why: a bank shared by every MoE layer (`global`, G = 1) is GloBE's premise, but published basis
sharing uses at most 2 adjacent layers (Basis Sharing; Sub-MoE found 2 best, 3 worse). This module
maps a scope to G banks over the L MoE layers, K adjacent layers per bank (the last bank takes the
remainder): global = one bank (K = L), layer = one bank per layer (K = 1), group:K = ceil(L / K)
banks. Experts are numbered layer-major (i = li * E + e), so each bank owns one contiguous range of
experts, which the warm start uses (one warm start per bank on a view of its experts).

The fitted family then has bank (G, m, r, d) with m atoms PER BANK, gain (G,), layer_bank (L,)
(artifacts.Family); every expert mixes only the atoms of its layer's bank, its codes are (m,) within
that bank, and the temperature, the support target and all metrics stay per family.
"""

from __future__ import annotations

import math

import torch

from ..config import parse_share

__all__ = ["bank_ranges", "expert_banks", "layer_banks", "n_banks", "parse_share", "warm_start_banks"]


def layer_banks(share: str, n_layers: int) -> list[int]:
    """Bank index of each of the n_layers MoE layers (by position li): li // K."""
    k = parse_share(share)
    k = n_layers if k is None else k
    return [li // max(1, k) for li in range(n_layers)]


def n_banks(share: str, n_layers: int) -> int:
    """G = ceil(L / K) (1 for global)."""
    k = parse_share(share)
    return 1 if k is None else math.ceil(n_layers / k)


def expert_banks(layer_bank: list[int], experts_per_layer: int) -> torch.Tensor:
    """Bank of every expert (N,) int64, N = len(layer_bank) * experts_per_layer (layer-major)."""
    return torch.tensor(layer_bank, dtype=torch.int64).repeat_interleave(int(experts_per_layer))


def bank_ranges(layer_bank: list[int], experts_per_layer: int) -> list[tuple[int, int]]:
    """[(lo, hi)] expert range of each bank b = 0..G-1 (contiguous: adjacent layers, layer-major experts)."""
    E = int(experts_per_layer)
    out: dict[int, list[int]] = {}
    for li, b in enumerate(layer_bank):
        out.setdefault(b, []).append(li)
    ranges = []
    for b in range(len(out)):
        lis = out[b]
        if lis != list(range(lis[0], lis[-1] + 1)):
            raise ValueError(f"bank {b} holds non-adjacent layers {lis}")
        ranges.append((lis[0] * E, (lis[-1] + 1) * E))
    return ranges


def warm_start_banks(W: torch.Tensor, scales: torch.Tensor, layer_bank: list[int], experts_per_layer: int, m: int,
                     r: int, target: int, *, kind: str = "entmax", alpha: float = 1.5, T_min: float = 1e-3,
                     T_max: float = 1e3, whiten=None, name: str = "", **kw):
    """`init.warm_start` of each bank on its own experts (a view, no copy), then one temperature for all.

    W (N, p, d), scales (N,). Returns an init.WarmStart with bank (G, m, r, d), logits (N, m), sv (N, k),
    T calibrated on the live experts of the whole family (the support control is per family).
    """
    from .init import WarmStart, live_experts, warm_start
    from .temperature import calibrate

    ranges = bank_ranges(layer_bank, experts_per_layer)
    if len(ranges) == 1:
        return warm_start(W, scales, m, r, target, kind=kind, alpha=alpha, T_min=T_min, T_max=T_max,
                          whiten=whiten, name=name, **kw)
    banks, logits, sv = [], [], []
    for b, (lo, hi) in enumerate(ranges):
        wb = None if whiten is None else (lambda idx, lo=lo: whiten(idx + lo))
        ws = warm_start(W[lo:hi], scales[lo:hi], m, r, target, kind=kind, alpha=alpha, T_min=T_min, T_max=T_max,
                        whiten=wb, name=f"{name} bank {b}".strip(), **kw)
        banks.append(ws.bank)
        logits.append(ws.logits)
        sv.append(ws.sv)
    z = torch.cat(logits)
    live = live_experts(scales)
    T = calibrate(z[live] if live.any() else z, target, kind, alpha, T_min, T_max)
    return WarmStart(bank=torch.stack(banks), logits=z, T=T, gain=ws.gain, sv=torch.cat(sv), scales=scales)

"""Test and benchmark helper (not the compression API).
Random GloBE artifacts matching a model, for tests and speed benchmarks (no fit needed).

Why: runtime correctness (parity, caching, export) and speed do not depend on how well the bank fits,
so artifacts with the right shapes and realistic sparsity are enough. W_hat's RMS is set to the
model's expert-weight RMS so activations stay in a sane range, also in bf16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import compat
from ..artifacts import Artifacts, Family


def random_artifacts(model: nn.Module, families: Sequence[str] = ("up", "gate"), m: int = 8, r: int | None = None,
                     support: int = 3, seed: int = 0, activation: str = "silu", gain: float = 0.8,
                     col_scale: bool = False, banks: int = 1, kept: Sequence[int] = ()) -> Artifacts:
    """Artifacts for every MoE layer of `model`: `banks` banks (G, m, r, d) (MoE layer li uses bank
    li % banks), codes with `support` nonzeros per expert (positive, summing to 1), A (N, p, r) scaled
    so W_hat matches the experts' RMS. r defaults to p/2. kept: global ids of experts kept uncompressed
    (bank.keep_fraction; their A is zero, as a fit leaves it)."""
    g = torch.Generator().manual_seed(seed)
    layers = compat.moe_layer_ids(model)
    first = compat.get_experts(model, layers[0])
    info = compat.experts_info(first)
    E, p, d = info.num_experts, info.p, info.d
    r = r or max(1, p // 2)
    N = len(layers) * E
    gu = compat.gate_up_weight(first)
    w_rms = float(gu.float().pow(2).mean().sqrt()) if not gu.is_meta else 0.02
    fams = {}
    for f in families:
        bank = torch.randn(banks, m, r, d, generator=g)
        codes = torch.zeros(N, m)
        k = min(support, m)
        for i in range(N):
            idx = torch.randperm(m, generator=g)[:k]
            v = torch.rand(k, generator=g) + 0.1
            codes[i, idx] = v / v.sum()
        gains = torch.tensor([gain * (1 + 0.25 * b) for b in range(banks)])
        fa = Family.from_fit(bank, codes, torch.zeros(N, p, r), gains, E, activation=activation,
                             layer_bank=[li % banks for li in range(len(layers))],
                             col_scale=(torch.rand(d, generator=g) + 0.5) if col_scale else None,
                             meta={"map": "random", "seed": seed})
        mixed_rms = float(fa.compose(torch.arange(min(N, 8))).pow(2).mean().sqrt())
        A = torch.randn(N, p, r, generator=g) * (w_rms / (mixed_rms * r**0.5))
        A[list(kept)] = 0.0
        fa.A_layers = list(A.split(E))
        fa.kept = sorted(int(i) for i in kept)
        for i in fa.kept:  # the fit's placeholder for a kept expert: one code of 1.0
            fa.codes[i] = 0.0
            fa.codes[i, i % m] = 1.0
        fams[f] = fa
    return Artifacts(families=fams, model_type=compat.text_config(model.config).model_type, moe_layers=layers,
                     num_experts=E, hidden_size=d, expert_intermediate_size=p, source="random")


@torch.no_grad()
def dense_reference(model: nn.Module, arts: Artifacts) -> nn.Module:
    """Write W_hat = arts.reconstruct() into the model's fused gate/up weight (in place; use a copy); experts
    kept uncompressed keep the model's own rows."""
    for L in arts.moe_layers:
        gu = compat.gate_up_weight(compat.get_experts(model, L))  # a view of the parameter
        sl = arts.layer_slice(L)
        keep = set(arts.kept_in_layer(L))
        local = [e for e in range(arts.num_experts) if e not in keep]
        idx = torch.tensor([sl.start + e for e in local], dtype=torch.int64)
        for f in compat.GATE_UP_ORDER:
            if f in arts.families and local:
                compat.family_rows(gu, f)[local] = arts.families[f].reconstruct(idx).to(gu)
    return model

"""GloBEExperts: drop-in replacement for a transformers-5 fused experts module.

Why: same forward signature as e.g. Qwen2MoeExperts, `(hidden_states (T, d), top_k_index (T, k),
top_k_weights (T, k)) -> (T, d)`, so the MoE block (router, shared expert, its gate) is untouched.
For a fitted family f (gate, up) of expert e:

    f(x) = A_f[e] @ (tilde_B_f[e] @ x)          A_f (E, p, r) with scales folded, tilde_B_f (r, d)

The cache block of expert e stacks the fitted families' tilde_B rows [gate; up] -> (R, d), so one GEMM
gives both projections of rank r, then one thin GEMM per family applies A. With compose_full the
block holds A_f tilde_B_f (p, d) instead. Families absent from the artifacts keep their dense weight
(E, p, d); Down is always dense (E, d, p), the original Parameter object.

Tokens are grouped by expert (stable sort of the T*k assignments), then one GEMM chain per ACTIVE
expert on its contiguous slice: no per-token Python loop. The (T*k, d) outputs are weighted,
un-permuted and summed over k, as transformers' grouped_mm path does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compat import ExpertsInfo, plain_experts
from ..errors import GlobeError
from .cache import ExpertCache, FamilyRuntime

FAMILY_ORDER = ("gate", "up")  # row order inside gate_up_proj and inside a cache block


class GloBEExperts(nn.Module):
    """Routed experts with Up/Gate from a global basis bank; see the module docstring."""

    def __init__(self, info: ExpertsInfo, down_proj: nn.Parameter, A: dict[str, torch.Tensor],
                 dense: dict[str, torch.Tensor], families: dict[str, FamilyRuntime], base: int,
                 compute_dtype: torch.dtype, mode: str = "full", capacity: int = 16, compose_full: bool = False,
                 collect_stats: bool = False, mixed: dict[str, torch.Tensor] | None = None, layer: int = -1):
        super().__init__()
        E, p, d = info.num_experts, info.p, info.d
        if set(A) | set(dense) != set(FAMILY_ORDER) or set(A) & set(dense):
            raise GlobeError(f"layer {layer}: each of gate/up must be either fitted or dense, got "
                             f"fitted={sorted(A)} dense={sorted(dense)}")
        self.info, self.layer, self.base = info, layer, base
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, d, p
        self.act_fn = info.act_fn
        self.compute_dtype, self.compose_full = compute_dtype, bool(compose_full) and bool(A)
        self.down_proj = down_proj  # (E, d, p), shared with the original module
        self.fitted = [f for f in FAMILY_ORDER if f in A]
        self.families = {f: families[f] for f in self.fitted}
        for f, a in A.items():
            if a.shape[:2] != (E, p):
                raise GlobeError(f"layer {layer}: A_{f} has shape {tuple(a.shape)}, expected ({E}, {p}, r)")
            self.register_buffer(f"A_{f}", a.to(compute_dtype), persistent=False)  # (E, p, r)
        for f, w in dense.items():
            if w.shape != (E, p, d):
                raise GlobeError(f"layer {layer}: dense {f} weight has shape {tuple(w.shape)}, "
                                 f"expected ({E}, {p}, {d})")
            self.register_buffer(f"W_{f}", w.to(compute_dtype).contiguous(), persistent=False)  # (E, p, d)
        self._mixed = dict(mixed or {})  # f -> (E, r, d) stored tilde_B (save_mixed checkpoints)
        # Row layout of a cache block: family f occupies rows [off, off + width).
        self.rows: dict[str, tuple[int, int]] = {}
        off = 0
        for f in self.fitted:
            w = p if self.compose_full else self._rank(f)
            self.rows[f] = (off, off + w)
            off += w
        self.cache: ExpertCache | None = None
        self.cache = ExpertCache(mode if self.fitted else "none", E, self._compose_block, capacity, collect_stats)
        if self.cache.table is not None:
            self._mixed = {}  # the table now holds every block

    # ---- composition ---------------------------------------------------------------------------
    def _rank(self, f: str) -> int:
        return self._mixed[f].shape[1] if f in self._mixed else self.families[f].r

    def mixed(self, f: str, e: int) -> torch.Tensor:
        """tilde_B of family f for expert e: (r, d) in the compute dtype."""
        if f in self._mixed:
            return self._mixed[f][e]
        if self.cache is not None and self.cache.table is not None and not self.compose_full:
            lo, hi = self.rows[f]
            return self.cache.table[e, lo:hi]
        return self.families[f].compose(self.base + e, self.compute_dtype)

    def _compose_block(self, e: int) -> torch.Tensor:
        parts = [self.mixed(f, e) for f in self.fitted]
        if self.compose_full:
            parts = [getattr(self, f"A_{f}")[e] @ t for f, t in zip(self.fitted, parts)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def weight(self, f: str, e: int) -> torch.Tensor:
        """Reconstructed (p, d) weight of family f for expert e, fp32."""
        if f not in self.fitted:
            return getattr(self, f"W_{f}")[e].float()
        if self.compose_full and self.cache.table is not None:
            lo, hi = self.rows[f]
            return self.cache.table[e, lo:hi].float()
        return getattr(self, f"A_{f}")[e].float() @ self.mixed(f, e).float()

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        T, d = hidden_states.shape
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)  # (T*k,)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync
        x = hidden_states.index_select(0, order // k)  # (T*k, d), grouped by expert
        cd, od = self.compute_dtype, self.down_proj.dtype
        if x.dtype != cd:
            x = x.to(cd)
        active = [e for e, c in enumerate(counts) if c and e < self.num_experts]
        blocks = self.cache.get_many(active) if self.fitted else [None] * len(active)
        out = torch.zeros((x.shape[0], d), dtype=od, device=x.device)
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        for e, blk in zip(active, blocks):
            s, t = starts[e], starts[e + 1]
            xe = x[s:t]  # (n, d)
            z = xe @ blk.T if blk is not None else None  # (n, R)
            proj = {}
            for f in FAMILY_ORDER:
                if f in self.rows:
                    lo, hi = self.rows[f]
                    proj[f] = z[:, lo:hi] if self.compose_full else z[:, lo:hi] @ getattr(self, f"A_{f}")[e].T
                else:
                    proj[f] = xe @ getattr(self, f"W_{f}")[e].T
            h = self.act_fn(proj["gate"]) * proj["up"]  # (n, p)
            out[s:t] = h.to(od) @ self.down_proj[e].T
        out.mul_(top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(od))
        res = torch.empty_like(out)
        res[order] = out
        return res.view(T, k, d).sum(dim=1).to(hidden_states.dtype)

    # ---- conversion ----------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense_module: nn.Module, info: ExpertsInfo, A: dict[str, torch.Tensor],
                   families: dict[str, FamilyRuntime], base: int, **kw: Any) -> GloBEExperts:
        """Replace the fitted families of a transformers experts module; the rest is reused as is."""
        p = info.p
        gu = dense_module.gate_up_proj
        dense = {f: gu.detach()[:, i * p:(i + 1) * p].clone() for i, f in enumerate(FAMILY_ORDER) if f not in A}
        return cls(info, dense_module.down_proj, A, dense, families, base, **kw)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """A plain transformers experts module with the reconstructed gate_up_proj (E, 2p, d)."""
        E, p, d = self.num_experts, self.intermediate_dim, self.hidden_dim
        gu = torch.empty((E, 2 * p, d), dtype=self.down_proj.dtype, device=self.down_proj.device)
        for e in range(E):
            for i, f in enumerate(FAMILY_ORDER):
                gu[e, i * p:(i + 1) * p] = self.weight(f, e)
        return plain_experts(self.info, gu, self.down_proj)

    def extra_repr(self) -> str:
        ranks = {f: hi - lo for f, (lo, hi) in self.rows.items()}
        return (f"layer={self.layer}, experts={self.num_experts}, d={self.hidden_dim}, p={self.intermediate_dim}, "
                f"fitted={ranks}, cache={self.cache.mode}, compute_dtype={self.compute_dtype}")

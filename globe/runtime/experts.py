"""GloBEExperts: drop-in replacement for a transformers-5 fused experts module.

Why: same forward signature as e.g. Qwen2MoeExperts, `(hidden_states (T, d), top_k_index (T, k),
top_k_weights (T, k)) -> (T, d)`, so the MoE block (router, shared expert, its gate) is untouched.
For a fitted family f (gate, up) of expert e of MoE layer L:

    f(x) = A_f[e] @ (tilde_B_f[e] @ x)          A_f = store[f].A(L) (E, p, r), tilde_B_f (r, d)

The families live in one `GlobeStore` (model.globe, shared by every layer, see cache.py); this module
holds a reference to it, the layer's Down `down_proj` (E, d, p) (the original Parameter when patched),
dense weights `W_{f}` (E, p, d) of families that were not fitted, and in `full` mode the composed
table (E, R, d) as a non-persistent buffer, so `.to()` / `.half()` / device moves carry everything.
The cache block of expert e stacks the fitted families' tilde_B rows [gate; up] -> (R, d), so one GEMM
gives both projections of rank r, then one thin GEMM per family applies A. With compose_full the
block holds A_f tilde_B_f (p, d) instead.

Tokens are grouped by expert (stable sort of the T*k assignments), then one GEMM chain per ACTIVE
expert on its contiguous slice: no per-token Python loop. The (T*k, d) outputs are weighted,
un-permuted and summed over k, as transformers' grouped_mm path does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compat import ExpertsInfo
from ..errors import GlobeError
from .cache import ExpertCache

FAMILY_ORDER = ("gate", "up")  # row order inside gate_up_proj and inside a cache block


class GlobeStore(nn.ModuleDict):
    """The fitted families of a model ({'up': FamilyStore, 'gate': ...}), registered as `model.globe`."""


class GloBEExperts(nn.Module):
    """Routed experts of one MoE layer with Up/Gate from the global banks; see the module docstring."""

    def __init__(self, info: ExpertsInfo, down_proj: nn.Parameter, store: GlobeStore, layer: int,
                 dense: dict[str, torch.Tensor] | None = None, mode: str = "full", capacity: int = 16,
                 compose_full: bool = False, collect_stats: bool = False, build: bool = True):
        super().__init__()
        dense = dict(dense or {})
        E, p, d = info.num_experts, info.p, info.d
        fitted = [f for f in FAMILY_ORDER if f in store]
        if set(fitted) | set(dense) != set(FAMILY_ORDER) or set(fitted) & set(dense):
            raise GlobeError(f"layer {layer}: each of gate/up must be either fitted or dense, got "
                             f"fitted={fitted} dense={sorted(dense)}")
        self.info, self.layer = info, layer
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, d, p
        self.act_fn = info.act_fn
        self.compose_full = bool(compose_full) and bool(fitted)
        self._store = (store,)  # a reference, not a submodule: the store is registered once, on the model
        self.down_proj = down_proj  # (E, d, p)
        self.fitted = fitted
        for f in fitted:
            a = store[f].A(layer)
            if a.shape[:2] != (E, p):
                raise GlobeError(f"layer {layer}: A_{f} has shape {tuple(a.shape)}, expected ({E}, {p}, r)")
        for f, w in dense.items():
            if w.shape != (E, p, d):
                raise GlobeError(f"layer {layer}: dense {f} weight has shape {tuple(w.shape)}, "
                                 f"expected ({E}, {p}, {d})")
            self.register_buffer(f"W_{f}", w.contiguous())  # (E, p, d), persistent: part of an export
        self.rows: dict[str, tuple[int, int]] = {}  # family f occupies rows [lo, hi) of a cache block
        off = 0
        for f in fitted:
            w = p if self.compose_full else store[f].r
            self.rows[f] = (off, off + w)
            off += w
        self.register_buffer("table", None, persistent=False)  # (E, R, d) in full mode
        self.cache = ExpertCache(mode if fitted else "none", E, self._compose_block, capacity, collect_stats)
        if build:
            self.build_cache()

    # ---- state ---------------------------------------------------------------------------------
    @property
    def store(self) -> GlobeStore:
        return self._store[0]

    def A(self, f: str) -> torch.Tensor:
        return self.store[f].A(self.layer)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype blocks are composed in: the adapters' (they follow `.to()` like the model)."""
        return self.A(self.fitted[0]).dtype if self.fitted else self.down_proj.dtype

    def build_cache(self) -> None:
        """Compose the full table (mode full); a no-op otherwise. Runs at the first forward if not before."""
        if self.cache.mode == "full" and self.fitted:
            self.table = self.cache.build_table()

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.cache.clear()  # LRU blocks are recomposed in the new dtype/device on demand
        self.cache.table = self.table
        return self

    # ---- composition ---------------------------------------------------------------------------
    def mixed(self, f: str, e: int) -> torch.Tensor:
        """tilde_B of family f for expert e: (r, d) in the compute dtype."""
        if self.table is not None and not self.compose_full:
            lo, hi = self.rows[f]
            return self.table[e, lo:hi]
        return self.store[f].compose(self.layer, e, self.compute_dtype)

    def _compose_block(self, e: int) -> torch.Tensor:
        cd = self.compute_dtype
        parts = [self.store[f].compose(self.layer, e, cd) for f in self.fitted]
        if self.compose_full:
            parts = [self.A(f)[e] @ t for f, t in zip(self.fitted, parts)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def weight(self, f: str, e: int) -> torch.Tensor:
        """Reconstructed (p, d) weight of family f for expert e, fp32."""
        if f not in self.fitted:
            return getattr(self, f"W_{f}")[e].float()
        if self.compose_full and self.table is not None:
            lo, hi = self.rows[f]
            return self.table[e, lo:hi].float()
        return self.A(f)[e].float() @ self.mixed(f, e).float()

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.table is None and self.cache.mode == "full" and self.fitted:
            self.build_cache()  # models built by from_pretrained (exported code) compose on first use
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
        A = {f: self.A(f) for f in self.fitted}
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
                    proj[f] = z[:, lo:hi] if self.compose_full else z[:, lo:hi] @ A[f][e].T
                else:
                    proj[f] = xe @ getattr(self, f"W_{f}")[e].T.to(cd)
            h = self.act_fn(proj["gate"]) * proj["up"]  # (n, p)
            out[s:t] = h.to(od) @ self.down_proj[e].T
        out.mul_(top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(od))
        res = torch.empty_like(out)
        res[order] = out
        return res.view(T, k, d).sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        ranks = {f: hi - lo for f, (lo, hi) in self.rows.items()}
        return (f"layer={self.layer}, experts={self.num_experts}, d={self.hidden_dim}, p={self.intermediate_dim}, "
                f"fitted={ranks}, cache={self.cache.mode}, compute_dtype={self.compute_dtype}")

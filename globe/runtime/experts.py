"""GloBEExperts: drop-in replacement for a transformers-5 fused experts module.

Why: same forward signature as e.g. Qwen2MoeExperts, `(hidden_states (T, d), top_k_index (T, k),
top_k_weights (T, k)) -> (T, d)`, so the MoE block (router, shared expert, its gate) is untouched.
For a fitted family f (gate, up) of expert e of MoE layer L:

    f(x) = A_f[e] @ (tilde_B_f[e] @ x)          A_f = store[f].A(L) (E, p, r), tilde_B_f (r, d)

The families live in one `GlobeStore` (model.globe, shared by every layer, see store.py); this module
holds a reference to it, the layer's Down `down_proj` (E, d, p) (the original Parameter when patched),
dense weights `W_{f}` (E, p, d) of families that were not fitted, and the composed blocks: in `full`
mode one table (E, R, d), a non-persistent buffer, so `.to()` / `.half()` / device moves carry it; in
`lru` / `none` a `SlabCache` (cache.py), rebuilt empty after a cast. A block stacks the fitted
families' tilde_B rows [gate; up] -> (R, d), so one GEMM gives both rank-r projections, then one thin
GEMM per family applies A; with compose_full the block holds A_f tilde_B_f (p, d) instead.

Experts kept uncompressed (bank.keep_fraction) hold their original gate/up in `kept_{f}` (K, p, d); a
call splits its assignments once (one host sync) into the kept ones, run as a dense layer of K
experts (gate/up from kept_{f}, Down read in place from down_proj: no copy), and the others, run
through the bank path as above; the two parts add into the output. The `full` table then holds only
the E - K fitted experts' blocks (E - K, R, d), found through a (E,) map.

The compute runs in kernels.py: `choose_path` picks grouped GEMMs, a per-expert loop or a gather path
from (device, dtype, T*k) only, so every cache mode takes the same path and modes agree bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compat import GATE_UP_ORDER, ExpertsInfo
from ..errors import GlobeError
from .cache import MODES, SlabCache, build_table, compose_blocks
from .kernels import Blocks, LayerWeights, active_experts, choose_path, experts_forward

FAMILY_ORDER = GATE_UP_ORDER  # row order inside the fused gate/up weight and inside a cache block


class GlobeStore(nn.ModuleDict):
    """The fitted families of a model ({'up': FamilyStore, 'gate': ...}), registered as `model.globe`."""


class GloBEExperts(nn.Module):
    """Routed experts of one MoE layer with Up/Gate from the global banks; see the module docstring."""

    def __init__(self, info: ExpertsInfo, down_proj: nn.Parameter, store: GlobeStore, layer: int,
                 dense: dict[str, torch.Tensor] | None = None, mode: str = "full", S_per_layer: int = 16,
                 compose_full: bool = False, collect_stats: bool = False, build: bool = True,
                 kept: tuple[list[int], dict[str, torch.Tensor]] | None = None):
        super().__init__()
        dense = dict(dense or {})
        E, p, d = info.num_experts, info.p, info.d
        fitted = [f for f in FAMILY_ORDER if f in store]
        if set(fitted) | set(dense) != set(FAMILY_ORDER) or set(fitted) & set(dense):
            raise GlobeError(f"layer {layer}: each of gate/up must be either fitted or dense, got "
                             f"fitted={fitted} dense={sorted(dense)}")
        if mode not in MODES:
            raise GlobeError(f"unknown cache mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "lru" and int(S_per_layer) < 1:
            raise GlobeError(f"cache.S_per_layer must be >= 1, got {S_per_layer}")
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
        self._set_kept(kept, E, p, d)
        self.rows: dict[str, tuple[int, int]] = {}  # family f occupies rows [lo, hi) of a block
        off = 0
        for f in fitted:
            w = p if self.compose_full else store[f].r
            self.rows[f] = (off, off + w)
            off += w
        self.mode = mode if fitted else "none"
        self.S_per_layer, self.collect_stats = int(S_per_layer), bool(collect_stats)
        self.register_buffer("table", None, persistent=False)  # (E, R, d) in full mode
        self.slab: SlabCache | None = None  # lru / none: made on first use in the current dtype/device
        self.stats: dict[str, int] | None = {"hits": 0, "misses": 0} if collect_stats else None
        if build:
            self.build_cache()

    def _set_kept(self, kept, E: int, p: int, d: int) -> None:
        """Experts kept uncompressed: local ids (ascending) and their fitted families' weights kept_{f} (K, p, d),
        persistent buffers (part of an export)."""
        ids, weights = (list(kept[0]), dict(kept[1])) if kept else ([], {})
        if ids != sorted(set(ids)) or not all(0 <= e < E for e in ids):
            raise GlobeError(f"layer {self.layer}: kept experts {ids} are not distinct ascending ids in [0, {E})")
        if ids and set(weights) != set(self.fitted):
            raise GlobeError(f"layer {self.layer}: kept experts need weights for {self.fitted}, got {sorted(weights)}")
        self.kept_ids = ids
        for f, w in weights.items():
            if w.shape != (len(ids), p, d):
                raise GlobeError(f"layer {self.layer}: kept {f} weight has shape {tuple(w.shape)}, expected "
                                 f"({len(ids)}, {p}, {d})")
            self.register_buffer(f"kept_{f}", w.contiguous())
        self.bank_ids = [e for e in range(E) if e not in set(ids)]  # experts the bank path serves
        self._kept_mask: torch.Tensor | None = None  # (E,) bool on the device: kept or not
        self._table_row: torch.Tensor | None = None  # (E,) int64 on the device: expert -> row of a compact table

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

    @property
    def block_shape(self) -> tuple[int, int]:
        return max((hi for _, hi in self.rows.values()), default=0), self.hidden_dim

    def layer_weights(self) -> LayerWeights:
        """The resident weights as the kernels read them (always the current buffers)."""
        return LayerWeights(down=self.down_proj, act_fn=self.act_fn, compute_dtype=self.compute_dtype,
                            rows=self.rows, A={f: self.A(f) for f in self.fitted},
                            dense={f: getattr(self, f"W_{f}") for f in FAMILY_ORDER if f not in self.fitted},
                            compose_full=self.compose_full)

    def _compose(self, experts: list[int], out) -> None:
        """Write the blocks of local `experts` into out[b] (one batched composition call)."""
        st = self.store
        fams = {f: st[f].bank_codes() for f in self.fitted if not st[f].has_mixed}
        mixed = {f: st[f].saved_tilde_B(self.layer) for f in self.fitted if st[f].has_mixed}
        compose_blocks(fams, self.layer_weights(), st[self.fitted[0]].base(self.layer), experts, out, mixed or None)

    def build_cache(self) -> None:
        """Compose the full table (mode full); a no-op otherwise. Runs at the first forward if not before."""
        if self.mode == "full" and self.fitted:
            self.table = build_table(self._compose, self.bank_ids, self.block_shape, self.compute_dtype,
                                     self.down_proj.device)

    def _row(self, e: int) -> int:
        """Row of expert e in the `full` table (compact when experts are kept)."""
        return self.bank_ids.index(e) if self.kept_ids else e

    def _table_blocks(self) -> Blocks:
        """The `full` table as the kernels read it: indexed by expert, or through a map when compact."""
        if not self.kept_ids:
            return Blocks([self.table])
        if self._table_row is None:
            row = torch.full((self.num_experts,), -1, dtype=torch.int64)
            row[self.bank_ids] = torch.arange(len(self.bank_ids))
            self._table_row = row.to(self.down_proj.device)
        groups = [-1] * self.num_experts
        for j, e in enumerate(self.bank_ids):
            groups[e] = j
        return Blocks([self.table], self._table_row, groups)

    def _slab(self) -> SlabCache:
        if self.slab is None:
            cap = self.S_per_layer if self.mode == "lru" else 0
            self.slab = SlabCache(cap, self.num_experts, self.block_shape, self.compute_dtype, self.down_proj.device,
                                  self._compose, self.collect_stats)
        return self.slab

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._kept_mask = self._table_row = None
        if self.slab is not None:  # cached blocks are recomposed in the new dtype/device on demand
            old, self.slab = self.slab.stats, None
            if old is not None:
                self._slab().stats.update(old)
        return self

    # ---- cache introspection -------------------------------------------------------------------
    def cache_stats(self) -> dict[str, int]:
        st = self.stats if self.mode == "full" else (self.slab.stats if self.slab is not None else self.stats)
        return dict(st or {"hits": 0, "misses": 0})

    def cached_experts(self) -> list[int]:
        """Composed experts held, least recently used first (all in full mode once built)."""
        if self.mode == "full":
            return list(self.bank_ids) if self.table is not None else []
        return self.slab.keys() if self.slab is not None else []

    def cache_nbytes(self) -> int:
        if self.table is not None:
            return self.table.numel() * self.table.element_size()
        return self.slab.nbytes() if self.slab is not None else 0

    def reset_stats(self) -> None:
        for st in (self.stats, self.slab.stats if self.slab is not None else None):
            if st is not None:
                st.update(hits=0, misses=0)

    # ---- composition ---------------------------------------------------------------------------
    def tilde_B(self, f: str, e: int) -> torch.Tensor:
        """tilde_B of family f for expert e: (r, d) in the compute dtype."""
        if self.table is not None and not self.compose_full and e not in self.kept_ids:
            lo, hi = self.rows[f]
            return self.table[self._row(e), lo:hi]
        return self.store[f].compose(self.layer, e, self.compute_dtype)

    def weight(self, f: str, e: int) -> torch.Tensor:
        """Reconstructed (p, d) weight of family f for expert e, fp32."""
        if f not in self.fitted:
            return getattr(self, f"W_{f}")[e].float()
        if e in self.kept_ids:
            return getattr(self, f"kept_{f}")[self.kept_ids.index(e)].float()
        if self.compose_full and self.table is not None:
            lo, hi = self.rows[f]
            return self.table[self._row(e), lo:hi].float()
        return self.A(f)[e].float() @ self.tilde_B(f, e).float()

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.kept_ids:
            return self._forward_split(hidden_states, top_k_index, top_k_weights)
        return self._forward_bank(hidden_states, top_k_index, top_k_weights)

    def _kept_layer(self) -> LayerWeights:
        """The kept experts as a dense layer: gate/up from kept_{f} (K, p, d) (an unfitted family's W_f and
        Down (E, ...) read in place, indexed by expert: experts_forward's `members`)."""
        dense = {f: getattr(self, f"kept_{f}") if f in self.fitted else getattr(self, f"W_{f}") for f in FAMILY_ORDER}
        return LayerWeights(down=self.down_proj, act_fn=self.act_fn,
                            compute_dtype=dense[self.fitted[0]].dtype, dense=dense)

    def _forward_split(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
        """Assignments to kept experts run densely, the others through the bank path; each part is a
        (n, 1) routing of the rows it serves, summed into the tokens' outputs (one host sync to split)."""
        T, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        if self._kept_mask is None:
            m = torch.zeros(self.num_experts, dtype=torch.bool)
            m[self.kept_ids] = True
            self._kept_mask = m.to(hidden.device)
        mask = self._kept_mask.index_select(0, flat)  # (n,) True: a kept expert
        tok = torch.arange(T, device=hidden.device).repeat_interleave(k)
        w = top_k_weights.reshape(-1, 1)
        out = torch.zeros_like(hidden)
        for rows, kept in (((~mask).nonzero().squeeze(1), False), (mask.nonzero().squeeze(1), True)):
            if not rows.numel():
                continue
            t = tok.index_select(0, rows)
            x, wr, ids = hidden.index_select(0, t), w.index_select(0, rows), flat.index_select(0, rows)[:, None]
            if kept:
                lw = self._kept_layer()
                path = choose_path(hidden.device, lw.compute_dtype, rows.numel())
                y = experts_forward(x, ids, wr, lw, None, path, members=self.kept_ids)
            else:
                y = self._forward_bank(x, ids, wr)
            out.index_add_(0, t, y)
        return out

    def _forward_bank(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
        lw = self.layer_weights()
        path = choose_path(hidden_states.device, lw.compute_dtype, top_k_index.numel())
        if not self.fitted:
            return experts_forward(hidden_states, top_k_index, top_k_weights, lw, None, path)
        if self.mode == "full":
            if self.table is None:  # models built by from_pretrained (exported code) compose on first use
                self.build_cache()
            if self.stats is not None:  # counting needs the active experts on the host (a sync)
                self.stats["hits"] += len(active_experts(top_k_index, self.num_experts)[0])
            return experts_forward(hidden_states, top_k_index, top_k_weights, lw, self._table_blocks(), path)
        active, counts = active_experts(top_k_index, self.num_experts)
        blocks = self._slab().lookup(active, counts)
        return experts_forward(hidden_states, top_k_index, top_k_weights, lw, blocks, path, counts)

    def extra_repr(self) -> str:
        ranks = {f: hi - lo for f, (lo, hi) in self.rows.items()}
        return (f"layer={self.layer}, experts={self.num_experts}, d={self.hidden_dim}, p={self.intermediate_dim}, "
                f"fitted={ranks}, kept={len(self.kept_ids)}, cache={self.mode}, compute_dtype={self.compute_dtype}")

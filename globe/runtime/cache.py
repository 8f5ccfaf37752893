"""Precomposition of tilde_B_i and the per-layer expert cache (full | lru | none).

Why: an expert's Up/Gate is A_i (tilde_B_i x) with tilde_B_i = phi(g * sum_j alpha_ij B_j) * col_scale.
Composing tilde_B_i costs nnz(alpha_i) * r * d multiply-adds, more than the expert's own GEMV, so it is
done once and kept. `FamilyRuntime` holds one family's global bank and sparse codes (CSR over all N
experts, layer-major i = li * E + e) and composes one expert at a time, always with the same kernel and
shapes so that every cache mode produces bit-identical blocks.

`ExpertCache` keeps, per MoE layer, one block per expert: (R, d) with R = sum of the fitted families'
ranks (rows [gate; up]), or (P, d) = A_i tilde_B_i rows when compose_full is on.
  full  all E blocks composed at construction into one (E, R, d) table
  lru   OrderedDict of at most `capacity` blocks; miss -> compose, insert, evict least recently used
  none  compose on every call
Hit/miss counters exist only with collect_stats=True (a None check in the hot path, nothing more).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from ..artifacts import FamilyArtifact, activation_fn
from ..errors import GlobeError

MODES = ("full", "lru", "none")


class FamilyRuntime:
    """One fitted family, shared by every MoE layer: bank (m, r*d), CSR codes, gain, phi, col_scale."""

    def __init__(self, name: str, bank: torch.Tensor | None, indptr: torch.Tensor | None,
                 indices: torch.Tensor | None, values: torch.Tensor | None, r: int, d: int, gain: float,
                 activation: str, col_scale: torch.Tensor | None = None):
        self.name, self.r, self.d, self.gain, self.activation = name, r, d, float(gain), activation
        self.act = activation_fn(activation)
        self.bank = None if bank is None else bank.reshape(bank.shape[0], r * d)  # (m, r*d) compute dtype
        self.indptr = None if indptr is None else [int(v) for v in indptr.tolist()]  # N + 1
        self.indices = indices  # (nnz,) int64
        self.values = values  # (nnz,) fp32
        # Host copies: composing reads them without a device sync.
        self._idx = [] if indices is None else [int(v) for v in indices.tolist()]
        self._val = [] if values is None else [float(v) for v in values.float().tolist()]
        self.col_scale = None if col_scale is None else col_scale.float()  # (d,)

    @classmethod
    def from_artifact(cls, name: str, fa: FamilyArtifact, dtype: torch.dtype, device: torch.device) -> FamilyRuntime:
        """Cast the bank to the compute dtype; codes become CSR (zeros = pruned) in fp32."""
        n, m, p, r, d = fa.shape
        indptr, indices, values = sparse_codes(fa.codes)
        return cls(name, fa.bank.detach().to(device=device, dtype=dtype), indptr, indices.to(device),
                   values.to(device), r, d, fa.gain, fa.activation,
                   None if fa.col_scale is None else fa.col_scale.detach().to(device))

    @property
    def has_bank(self) -> bool:
        return self.bank is not None

    def nnz(self, i: int) -> int:
        assert self.indptr is not None
        return self.indptr[i + 1] - self.indptr[i]

    def compose(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """tilde_B for global expert i: (r, d) in dtype. Mixing and phi in fp32."""
        if self.bank is None or self.indptr is None:
            raise GlobeError(f"family {self.name}: no bank loaded (save_mixed checkpoint); cannot compose")
        lo, hi = self.indptr[i], self.indptr[i + 1]
        g = self.gain
        if hi == lo:
            mix = self.bank.new_zeros(self.r * self.d, dtype=torch.float32)
        else:  # fp32 accumulation straight from the stored atoms: no gathered copy of the k atoms
            mix = self.bank[self._idx[lo]].to(torch.float32, copy=True).mul_(g * self._val[lo])  # (r*d,)
            for j in range(lo + 1, hi):
                mix.add_(self.bank[self._idx[j]], alpha=g * self._val[j])
        if self.activation == "silu":
            torch.nn.functional.silu(mix, inplace=True)
        elif self.activation == "tanh":
            mix.tanh_()
        else:
            mix = self.act(mix)
        out = mix.view(self.r, self.d)
        if self.col_scale is not None:
            out.mul_(self.col_scale)
        return out.to(dtype)

    def release_bank(self) -> None:
        """Drop the bank once every block is precomposed (full cache): saves m * r * d numbers."""
        self.bank = None


def sparse_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense (N, m) codes -> CSR: indptr (N+1,) int64, indices (nnz,) int64, values (nnz,) fp32."""
    mask = codes != 0
    indptr = torch.zeros(codes.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = mask.sum(1).cumsum(0)
    rows, cols = mask.nonzero(as_tuple=True)
    return indptr, cols.to(torch.int64), codes[rows, cols].float()


class ExpertCache:
    """Per-layer store of composed expert blocks; `get_many(experts)` returns one block per id."""

    def __init__(self, mode: str, num_experts: int, compose: Callable[[int], torch.Tensor],
                 capacity: int = 16, collect_stats: bool = False):
        if mode not in MODES:
            raise GlobeError(f"unknown cache mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "lru" and capacity < 1:
            raise GlobeError(f"cache capacity must be >= 1, got {capacity}")
        self.mode, self.num_experts, self.compose, self.capacity = mode, num_experts, compose, int(capacity)
        self.lru: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.table: torch.Tensor | None = None  # (E, R, d) in full mode
        self.stats: dict[str, int] | None = {"hits": 0, "misses": 0} if collect_stats else None
        if mode == "full":
            first = compose(0)
            self.table = first.new_empty((num_experts, *first.shape))
            self.table[0] = first
            for e in range(1, num_experts):
                self.table[e] = compose(e)

    def get(self, e: int) -> torch.Tensor:
        if self.table is not None:
            if self.stats is not None:
                self.stats["hits"] += 1
            return self.table[e]
        if self.mode == "none":
            if self.stats is not None:
                self.stats["misses"] += 1
            return self.compose(e)
        blk = self.lru.get(e)
        if blk is not None:
            self.lru.move_to_end(e)
            if self.stats is not None:
                self.stats["hits"] += 1
            return blk
        if self.stats is not None:
            self.stats["misses"] += 1
        blk = self.compose(e)
        self.lru[e] = blk
        if len(self.lru) > self.capacity:
            self.lru.popitem(last=False)
        return blk

    def get_many(self, experts: Sequence[int]) -> list[torch.Tensor]:
        return [self.get(e) for e in experts]

    def keys(self) -> list[int]:
        """Cached expert ids, least recently used first (all ids in full mode)."""
        if self.table is not None:
            return list(range(self.num_experts))
        return list(self.lru)

    def reset_stats(self) -> None:
        if self.stats is not None:
            self.stats.update(hits=0, misses=0)

    def clear(self) -> None:
        self.lru.clear()

    def nbytes(self) -> int:
        t = [self.table] if self.table is not None else list(self.lru.values())
        return sum(x.numel() * x.element_size() for x in t)


def simulate_lru(trace: Sequence[Sequence[int]], capacity: int, warmup: int = 0) -> dict[str, float]:
    """Replay a per-token routing trace (each item: the token's expert ids) through one LRU.

    The first `warmup` tokens fill the cache without being counted. Returns hits, misses, hit_rate.
    """
    cache = ExpertCache("lru", 0, compose=lambda e: _EMPTY, capacity=capacity, collect_stats=True)
    for t, ids in enumerate(trace):
        if t == warmup:
            cache.reset_stats()
        cache.get_many([int(i) for i in ids])
    assert cache.stats is not None
    h, m = cache.stats["hits"], cache.stats["misses"]
    return {"hits": h, "misses": m, "hit_rate": h / max(1, h + m)}


_EMPTY = torch.empty(0)

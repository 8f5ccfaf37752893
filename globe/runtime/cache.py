"""Family stores (the on-disk family tensors as module buffers), tilde_B composition, per-layer caches.

Why: an expert's Up/Gate is A_i (tilde_B_i x) with tilde_B_i = phi(g_b * sum_j alpha_ij B_bj) * col_scale.
Composing tilde_B_i costs nnz(alpha_i) * r * d multiply-adds, more than the expert's own GEMV, so it is
done once and kept. `FamilyStore` is an nn.Module whose buffers carry exactly the names of the format
(`globe.{f}.bank`, `.gain`, `.indptr`, `.indices`, `.values`, `.col_scale`, `.A_{L}`, `.mixed_{L}`;
see globe/artifacts.py), so a patched model's state_dict IS the family part of a globe export and
`.to()`, `.half()`, device moves apply to it like to any module. Composition always runs the same
kernel with the same shapes (fp32 accumulation from the stored atoms), so every cache mode produces
bit-identical blocks. Codes, gains and col_scale stay fp32 and the bank keeps its dtype under casts
(only A and the composed caches follow the model's dtype), so casting never changes which bits a
compose produces.

`ExpertCache` keeps, per MoE layer, one block per expert: (R, d) with R = sum of the fitted families'
ranks (rows [gate; up]), or (P, d) = A_i tilde_B_i rows when compose_full is on.
  full  all E blocks composed at construction into one (E, R, d) table (a buffer of the experts module)
  lru   OrderedDict of at most `capacity` blocks; miss -> compose, insert, evict least recently used
  none  compose on every call
Hit/miss counters exist only with collect_stats=True (a None check in the hot path, nothing more).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..artifacts import KEEP_FP32, activation_fn
from ..errors import GlobeError

MODES = ("full", "lru", "none")


def compose_one(bank: torch.Tensor, idx: Sequence[int], val: Sequence[float], gain: float, activation: str,
                col_scale: torch.Tensor | None, r: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """tilde_B = phi(gain * sum_k val_k bank[idx_k]) * col_scale: (r, d) in dtype; bank (m, r*d).

    fp32 accumulation straight from the stored atoms, in code order: no gathered copy of the atoms.
    """
    if not idx:
        mix = bank.new_zeros(r * d, dtype=torch.float32)
    else:
        mix = bank[idx[0]].to(torch.float32, copy=True).mul_(gain * val[0])  # (r*d,)
        for j, v in zip(idx[1:], val[1:]):
            mix.add_(bank[j], alpha=gain * v)
    if activation == "silu":
        torch.nn.functional.silu(mix, inplace=True)
    elif activation == "tanh":
        mix.tanh_()
    else:
        mix = activation_fn(activation)(mix)
    out = mix.view(r, d)
    if col_scale is not None:
        out.mul_(col_scale.to(out.device, torch.float32))
    return out.to(dtype)


class FamilyStore(nn.Module):
    """One fitted family shared by every MoE layer: bank (G, m, r, d), CSR codes, gains, A per layer."""

    def __init__(self, name: str, moe_layers: Sequence[int], num_experts: int, p: int, r: int, d: int, m: int,
                 banks: int, layer_bank: Sequence[int], activation: str, nnz: int, col_scale: bool = False,
                 mixed: bool = False, device: torch.device | str | None = "meta", dtype: torch.dtype = torch.float32):
        """An empty store (tensors on `device`, uninitialised) of the given shapes; filled by assigning its
        buffers (globe.runtime.patch.store_from_family, or a loader reading the format's tensors)."""
        super().__init__()
        self.name, self.layers, self.E = name, list(moe_layers), int(num_experts)
        self.p, self.r, self.d, self.m, self.G = int(p), int(r), int(d), int(m), int(banks)
        self.layer_bank, self.activation = [int(b) for b in layer_bank], activation
        self.has_mixed = bool(mixed)
        N = len(self.layers) * self.E
        kw = {"device": device}
        self.register_buffer("bank", torch.empty(self.G, self.m, r, d, dtype=dtype, **kw))
        self.register_buffer("gain", torch.empty(self.G, dtype=torch.float32, **kw))
        self.register_buffer("indptr", torch.empty(N + 1, dtype=torch.int64, **kw))
        self.register_buffer("indices", torch.empty(nnz, dtype=torch.int32, **kw))
        self.register_buffer("values", torch.empty(nnz, dtype=torch.float32, **kw))
        self.register_buffer("col_scale", torch.empty(d, dtype=torch.float32, **kw) if col_scale else None)
        for L in self.layers:
            self.register_buffer(f"A_{L}", torch.empty(self.E, p, r, dtype=dtype, **kw))
            if mixed:
                self.register_buffer(f"mixed_{L}", torch.empty(self.E, r, d, dtype=dtype, **kw))
        self._host: tuple | None = None
        self.released = False

    # ---- dtype/device: A and composed caches follow the model, the rest keeps its dtype -------------
    def _apply(self, fn, recurse: bool = True):
        keep = {n: b for n, b in self._buffers.items() if b is not None and (n in KEEP_FP32 or n == "bank")}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if new.dtype != old.dtype:  # move, never round-trip through a narrower dtype
                self._buffers[n] = old.to(new.device)
        return self

    # ---- access ----------------------------------------------------------------------------------
    def A(self, layer: int) -> torch.Tensor:
        """Adapters of MoE layer `layer` (a decoder-layer index): (E, p, r)."""
        return getattr(self, f"A_{layer}")

    def mixed(self, layer: int) -> torch.Tensor | None:
        """Stored tilde_B (E, r, d) of a save_mixed export, else None."""
        return getattr(self, f"mixed_{layer}") if self.has_mixed else None

    @property
    def dtype(self) -> torch.dtype:
        return self.A(self.layers[0]).dtype

    def _host_codes(self) -> tuple:
        """Host copies of the codes (read once, so composing never syncs with the device)."""
        if self._host is None:
            ptr = [int(v) for v in self.indptr.tolist()]
            idx = [int(v) for v in self.indices.tolist()]
            val = [float(v) for v in self.values.float().tolist()]
            gains = [float(g) for g in self.gain.float().tolist()]
            self._host = (ptr, idx, val, gains)
        return self._host

    def nnz(self, i: int) -> int:
        ptr = self._host_codes()[0]
        return ptr[i + 1] - ptr[i]

    def compose(self, layer: int, e: int, dtype: torch.dtype) -> torch.Tensor:
        """tilde_B of expert e of MoE layer `layer`: (r, d) in dtype."""
        li = self.layers.index(layer)
        mx = self.mixed(layer)
        if mx is not None:
            return mx[e].to(dtype)
        if self.released:
            raise GlobeError(f"family {self.name}: the bank was released after precomposing every expert")
        ptr, idx, val, gains = self._host_codes()
        i = li * self.E + e
        lo, hi = ptr[i], ptr[i + 1]
        b = self.layer_bank[li]
        cs = self.col_scale
        return compose_one(self.bank[b].reshape(self.m, self.r * self.d), idx[lo:hi], val[lo:hi], gains[b],
                           self.activation, cs, self.r, self.d, dtype)

    def release_bank(self) -> None:
        """Drop the bank once every block is precomposed (full cache): saves G * m * r * d numbers."""
        self.bank = torch.empty(0, device=self.bank.device, dtype=self.bank.dtype)
        self.released = True


class ExpertCache:
    """Per-layer store of composed expert blocks; `get_many(experts)` returns one block per id.

    In `full` mode the table is owned by the experts module (a buffer, so `.to()` moves it) and passed
    in through `table`; `build_table` composes it.
    """

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

    def build_table(self) -> torch.Tensor:
        first = self.compose(0)
        table = first.new_empty((self.num_experts, *first.shape))
        table[0] = first
        for e in range(1, self.num_experts):
            table[e] = self.compose(e)
        self.table = table
        return table

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

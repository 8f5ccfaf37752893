"""Composition of tilde_B blocks and the per-layer block cache (`lru`, `none`; `full` is a table).

Why: an expert's Up/Gate is A_i (tilde_B_i x) with tilde_B_i = phi(g_b * sum_j alpha_ij B_bj) * col_scale.
Composing tilde_B_i costs nnz(alpha_i) * r * d multiply-adds, more than the expert's own GEMV, so it is
done once and kept. There is ONE composition kernel, `compose_many`, used by every cache mode, the
export (save_mixed) and the loader, so every mode produces bit-identical blocks: fp32 accumulation in
code order, then phi and col_scale in fp32, then one cast. Each expert's bits do not depend on which
other experts are in the batch: on the CPU in row chunks of fixed size, elsewhere batched elementwise
ops over a prefix of experts sorted by nnz; never a GEMM whose blocking depends on the batch. On the
CPU a family may instead use the fused kernel (`BankCodes.kernel = "compiled"`, from cache.compile):
`_mix_into` under torch.compile, one pass over an expert's atoms, one expert per call; its bits may
differ from the eager kernel's by one rounding (FMA), so every compose of a family uses one kernel.

`SlabCache` keeps at most S composed blocks of one layer in a preallocated slab (S, R, d) with an
expert -> slot map and composes misses in one `compose_blocks` call straight into their slots
(S = 0: compose every call, mode `none`); misses beyond S are composed where the kernel uses them, a
few at a time (`kernels.LazyPart`), so `none` never holds a whole layer of blocks. `simulate_lru`
replays a routing trace through the same policy, so the hit rates `globe eval` reports are the runtime's.
"""

from __future__ import annotations

import logging
import math
import types
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import GlobeError
from ..maps import get_activation
from .kernels import Blocks, LayerWeights, LazyPart

MODES = ("full", "lru", "none")
_fused: dict[Any, Any] = {}  # specialisation -> torch.compile'd copy of _mix_into; "failed": True once one failed


@dataclass
class BankCodes:
    """One family's banks and sparse codes (host CSR over all N experts), as composition reads them.

    bank (m, r*d) is one bank; (G, m, r*d) are G banks, expert i using bank_of[i] with gain[bank_of[i]].
    """

    bank: torch.Tensor  # (m, r*d) or (G, m, r*d), in the dtype the atoms are stored in
    indptr: list[int]  # N + 1
    indices: list[int]  # nnz atom ids (within the expert's bank)
    values: list[float]  # nnz code values (pruned zeros absent)
    r: int
    d: int
    gain: float | Sequence[float] = 1.0  # one per bank
    activation: str = "silu"
    col_scale: torch.Tensor | None = None  # (d,) fp32
    bank_of: Sequence[int] | None = None  # (N,) bank of each expert; None: one bank
    kernel: str = "eager"  # eager | compiled (cache.compile, CPU only): one kernel per family and process
    max_nnz: int | None = None  # largest nnz of any expert (the fused kernel pads to it); None: counted on use

    def atoms(self, i: int) -> tuple[torch.Tensor, float]:
        """(the (m, r*d) bank of expert i, its gain)."""
        if self.bank.ndim == 2:
            return self.bank, float(self.gain if not isinstance(self.gain, Sequence) else self.gain[0])
        b = self.bank_of[i] if self.bank_of is not None else 0
        return self.bank[b], float(self.gain[b] if isinstance(self.gain, Sequence) else self.gain)

    @classmethod
    def from_dense(cls, bank: torch.Tensor, codes: torch.Tensor, gain: float = 1.0, activation: str = "silu",
                   col_scale: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> BankCodes:
        """bank (m, r, d), codes (N, m) with zeros = pruned."""
        m, r, d = bank.shape
        mask = codes != 0
        indptr = [0] + mask.sum(1).cumsum(0).tolist()
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(bank.reshape(m, r * d).to(dtype or bank.dtype), indptr, cols.tolist(),
                   codes[rows, cols].float().tolist(), r, d, float(gain), activation,
                   None if col_scale is None else col_scale.float())


def max_nnz(indptr: Sequence[int]) -> int:
    """Largest number of codes of any expert in CSR `indptr`."""
    return max((b - a for a, b in zip(indptr, indptr[1:])), default=0)


def _terms(fam: BankCodes, i: int) -> tuple[list[int], list[float]]:
    """Expert i's codes as (rows of the flat bank (G*m, r*d), coefficients gain * value), in code order."""
    lo, hi = fam.indptr[i], fam.indptr[i + 1]
    base = (fam.bank_of[i] if (fam.bank.ndim == 3 and fam.bank_of is not None) else 0) * fam.bank.shape[-2]
    g = fam.atoms(i)[1]
    return [base + fam.indices[j] for j in range(lo, hi)], [g * fam.values[j] for j in range(lo, hi)]


def check_codes(ptr: Sequence[int], idx: Sequence[int], val: Sequence[float], m: int, N: int, where: str) -> None:
    """GlobeError naming `where` unless (ptr, idx, val) are CSR codes of N experts over m atoms: ptr of
    length N + 1 from 0, non-decreasing, ending at len(idx) == len(val); every atom id in [0, m); every
    value finite. A damaged file would otherwise index out of range, or wrap a negative id silently."""
    if len(ptr) != N + 1 or ptr[0] != 0 or ptr[-1] != len(idx) or len(idx) != len(val):
        raise GlobeError(f"{where}: codes are not CSR over {N} experts (indptr of {len(ptr)} entries, first "
                         f"{ptr[0] if ptr else None}, last {ptr[-1] if ptr else None}; {len(idx)} indices, "
                         f"{len(val)} values)")
    if any(b < a for a, b in zip(ptr, ptr[1:])):
        raise GlobeError(f"{where}: codes indptr decreases (damaged file)")
    bad = next((i for i in idx if not 0 <= i < m), None)
    if bad is not None:
        raise GlobeError(f"{where}: code atom index {bad} outside [0, {m}) (damaged file)")
    if not all(math.isfinite(v) for v in val):
        raise GlobeError(f"{where}: code values hold NaN/inf (damaged file)")


def compose_many(fam: BankCodes, ids: Sequence[int], dtype: torch.dtype,
                 out: torch.Tensor | Sequence[torch.Tensor] | None = None, chunk: int = 65536,
                 max_batch: int = 16) -> torch.Tensor | Sequence[torch.Tensor]:
    """tilde_B_i = phi(g * sum_j alpha_ij B_j) * col_scale for global experts `ids`: (B, r, d) in dtype.

    Mixing, phi and col_scale in fp32 (DESIGN.md section 1), then one cast. Each expert's bits do not
    depend on the other ids (see the module docstring). out: a (B, r, d) tensor or B views (r, d) to
    write into (e.g. slab slots); returned. chunk: CPU working-set size in elements; max_batch: experts
    per batched step elsewhere (bounds the (max_batch, r*d) fp32 scratch). Raises GlobeError on ids
    outside the codes.
    """
    r, d, N = fam.r, fam.d, len(fam.indptr) - 1
    if any(not 0 <= i < N for i in ids):
        raise GlobeError(f"compose: expert ids must lie in [0, {N}), got {list(ids)}")
    if out is None:
        out = torch.empty((len(ids), r, d), dtype=dtype, device=fam.bank.device)
    if fam.bank.device.type == "cpu":
        if not (fam.kernel == "compiled" and _compose_fused(fam, ids, out)):
            _compose_cpu(fam, ids, out, max(d, chunk // d * d))
    else:
        for s in range(0, len(ids), max_batch):
            _compose_batched(fam, ids[s:s + max_batch], out, s)
    return out


def _compose_cpu(fam: BankCodes, ids, out, C: int) -> None:
    """Row-aligned chunks of C elements, chunk-major so the atoms' chunk stays in cache across experts.

    Every expert sees the same ops on the same chunk sizes whatever the batch, so its bits do not
    depend on it; no full-size fp32 temporaries.
    """
    rd, d = fam.r * fam.d, fam.d
    acc_buf = torch.empty(C, dtype=torch.float32)
    tmp_buf = torch.empty(C, dtype=torch.float32)
    banks = [fam.atoms(i) for i in ids]
    phi_ = get_activation(fam.activation).fn_
    for s in range(0, rd, C):
        t = min(rd, s + C)
        acc, tmp = acc_buf[:t - s], tmp_buf[:t - s]
        for b, i in enumerate(ids):
            bank, g = banks[b]
            lo, hi = fam.indptr[i], fam.indptr[i + 1]
            if hi == lo:
                acc.zero_()
            else:
                acc.copy_(bank[fam.indices[lo], s:t]).mul_(g * fam.values[lo])
                for j in range(lo + 1, hi):
                    acc.add_(tmp.copy_(bank[fam.indices[j], s:t]), alpha=g * fam.values[j])
            phi_(acc)
            if fam.col_scale is not None:
                acc.view(-1, d).mul_(fam.col_scale)
            out[b][s // d:t // d].copy_(acc.view(-1, d))


def _mix_into(out: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor, phi: Callable,
              col_scale: torch.Tensor | None) -> None:
    """out (r, d) = phi(sum_j coef[j] * bank[idx[j]]) [* col_scale]: bank (A, r*d) any float dtype, idx (k,)
    int64, coef (k,) fp32; fp32 accumulation in code order, one cast. Compiled, it is one pass over the k
    atoms (the eager kernel runs one torch op per atom and chunk)."""
    rows = bank.index_select(0, idx)
    acc = rows[0].float() * coef[0]
    for j in range(1, idx.shape[0]):
        acc = acc + rows[j].float() * coef[j]
    acc = phi(acc).view(out.shape)
    if col_scale is not None:
        acc = acc * col_scale
    out.copy_(acc)


def _compose_fused(fam: BankCodes, ids, out) -> bool:
    """Compose `ids` with the torch.compile'd `_mix_into`, one expert per call (so an expert's bits never
    depend on the batch); each expert's codes padded to fam.max_nnz with zero coefficients (adding an exact
    zero changes no bit). False, with nothing written, when it cannot run here: no fused kernel (compiling
    failed once in this process: no C++ compiler, an unsupported torch; logged once) or a non-contiguous
    out; the caller then uses the eager kernel."""
    k = fam.max_nnz if fam.max_nnz is not None else max_nnz(fam.indptr)
    if not ids:
        return True
    if k == 0 or _fused.get("failed") or any(not out[b].is_contiguous() for b in range(len(ids))):
        return False
    # one compiled copy (own code object) per specialisation, static shapes: its code, so its bits, depend on
    # the shapes alone, not on what this process compiled before (with dynamic shapes, a process that had
    # compiled other shapes first gave other bits than a fresh one: tests/test_remote_code.py); torch's
    # per-function recompile limit, which would silently run the uncompiled function, is never reached
    key = (fam.bank.dtype, out[0].dtype, fam.activation, fam.col_scale is None, k, fam.r, fam.d,
           fam.bank.numel() // (fam.r * fam.d))
    if key not in _fused:
        logging.getLogger("globe").info("cache.compile: compiling the composition kernel for %s banks, %s blocks, "
                                        "%s, up to %d codes, r %d x d %d (once per process; torch caches it on "
                                        "disk)", str(key[0]).removeprefix("torch."),
                                        str(key[1]).removeprefix("torch."), fam.activation, k, fam.r, fam.d)
        code = _mix_into.__code__.replace()
        fresh = types.FunctionType(code, _mix_into.__globals__, _mix_into.__name__)
        _fused[key] = torch.compile(fresh, dynamic=False, fullgraph=True)
    fn = _fused[key]
    flat = fam.bank.reshape(-1, fam.r * fam.d)  # (G*m, r*d): atom j of bank b is row b*m + j
    phi = get_activation(fam.activation).fn
    for b, i in enumerate(ids):
        rows, coef = _terms(fam, i)
        pad = k - len(rows)  # exact zeros on a row already read (an expert without codes: row 0)
        rows, coef = rows + [rows[0] if rows else 0] * pad, coef + [0.0] * pad
        try:
            fn(out[b], flat, torch.tensor(rows, dtype=torch.int64), torch.tensor(coef, dtype=torch.float32), phi,
               fam.col_scale)
        except Exception as e:  # compiling failed (e.g. no C++ compiler): the eager kernel from now on
            if b:
                raise
            _fused["failed"] = True
            logging.getLogger("globe").warning("cache.compile: the fused composition kernel is unavailable here "
                                               "(%s: %s); using the eager kernel", type(e).__name__,
                                               str(e).splitlines()[0][:200] if str(e) else "")
            return False
    return True


def fused_available() -> bool:
    """False once compiling the fused kernel failed in this process (every compose is eager from then on)."""
    return not _fused.get("failed")


def _compose_batched(fam: BankCodes, ids, out, base: int) -> None:
    """Experts sorted by nnz (descending): slot j updates the prefix of experts with nnz > j."""
    dev, rd = fam.bank.device, fam.r * fam.d
    flat_bank = fam.bank.reshape(-1, rd)  # (G*m, r*d): atom j of bank b is row b*m + j
    nnz = [fam.indptr[i + 1] - fam.indptr[i] for i in ids]
    perm = sorted(range(len(ids)), key=lambda b: -nnz[b])  # stable
    width = max(nnz, default=0)
    idx = [[0] * len(ids) for _ in range(width)]
    coef = [[0.0] * len(ids) for _ in range(width)]
    for q, b in enumerate(perm):
        for j, (row, c) in enumerate(zip(*_terms(fam, ids[b]))):
            idx[j][q], coef[j][q] = row, c
    idx_t = torch.tensor(idx, dtype=torch.int64).to(dev)  # one small copy each
    coef_t = torch.tensor(coef, dtype=torch.float32).to(dev)
    mix = torch.empty((len(ids), rd), dtype=torch.float32, device=dev)
    mix[sum(1 for c in nnz if c):].zero_()  # experts without codes: phi(0)
    for j in range(width):
        nb = sum(1 for b in perm if nnz[b] > j)
        rows = flat_bank.index_select(0, idx_t[j, :nb])  # (nb, r*d)
        if j == 0:
            torch.mul(rows, coef_t[0, :nb, None], out=mix[:nb])
        else:
            mix[:nb].addcmul_(rows, coef_t[j, :nb, None])
    get_activation(fam.activation).fn_(mix)
    mix = mix.view(len(ids), fam.r, fam.d)
    if fam.col_scale is not None:
        mix.mul_(fam.col_scale)
    for q, b in enumerate(perm):
        out[base + b].copy_(mix[q])


def compose_blocks(families: dict[str, BankCodes], lw: LayerWeights, base: int, experts: Sequence[int],
                   out: torch.Tensor | Sequence[torch.Tensor], mixed: dict[str, torch.Tensor] | None = None) -> None:
    """Write the (R, d) block of each local expert into out[b]: rows of family f at lw.rows[f].

    base: global index of the layer's expert 0 in the codes. mixed: stored tilde_B (E, r, d) per family,
    used instead of composing. With compose_full the rows hold A_f[e] @ tilde_B_f (one mm per expert).
    """
    dtype = lw.compute_dtype
    for f, (lo, hi) in lw.rows.items():
        if lw.compose_full:
            src = (mixed[f].index_select(0, torch.tensor(list(experts), device=mixed[f].device))
                   if mixed and f in mixed else compose_many(families[f], [base + e for e in experts], dtype))
            A = lw.A.get(f) if lw.A else None
            if A is None:
                raise GlobeError(f"compose_full: no adapters for family {f}")
            for b, e in enumerate(experts):
                torch.mm(A[e], src[b], out=out[b][lo:hi])
        elif mixed and f in mixed:
            for b, e in enumerate(experts):
                out[b][lo:hi].copy_(mixed[f][e])
        else:
            compose_many(families[f], [base + e for e in experts], dtype, out=[o[lo:hi] for o in out])


def build_table(compose: Callable[[list[int], Any], None], experts: int | Sequence[int], shape: tuple[int, int],
                dtype: torch.dtype, device: torch.device | str, chunk: int = 8) -> torch.Tensor:
    """The `full` table (G, R, d) of `experts` (ids, or a count E for 0..E-1), row g = experts[g]:
    compose(ids, out) called on chunks of experts."""
    experts = list(range(experts)) if isinstance(experts, int) else list(experts)
    table = torch.empty((len(experts), *shape), dtype=dtype, device=device)
    for s in range(0, len(experts), chunk):
        ids = experts[s:s + chunk]
        compose(ids, table[s:s + len(ids)])
    return table


class SlabCache:
    """At most S composed blocks of one layer in a preallocated slab (S, R, d), least recently used out.

    lookup(active, counts): the active experts' blocks as `Blocks`. Hits stay in their slots; misses are
    composed in one compose(experts, out) call, straight into free or evicted slots (never a slot of
    this call's own active experts); misses beyond S go to a `LazyPart`, composed where the kernel
    uses it (a chunk of blocks at a time on the grouped path). Recency: this call's
    experts become the most recent, touched in ascending (tokens, id), so when more than S are active
    the slab keeps the hits, then the misses with the most tokens. capacity 0 composes every call
    (mode `none`); a capacity above num_experts is num_experts.
    """

    def __init__(self, capacity: int, num_experts: int, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device | str, compose: Callable[[list[int], Any], None], collect_stats: bool = False):
        if capacity < 0:
            raise GlobeError(f"cache capacity must be >= 0, got {capacity}")
        # more slots than experts never hold anything: S > E is the same cache as S = E (not S empty blocks)
        self.capacity = min(int(capacity), int(num_experts))
        self.num_experts, self.shape, self.compose = num_experts, tuple(shape), compose
        self.dtype, self.device = dtype, torch.device(device)
        self.slab = torch.empty((self.capacity, *self.shape), dtype=dtype, device=device) if self.capacity else None
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recent first
        self.free = list(range(self.capacity))
        self.stats: dict[str, int] | None = {"hits": 0, "misses": 0} if collect_stats else None

    def lookup(self, active: Sequence[int], counts: Sequence[int] | None = None) -> Blocks:
        """Blocks of the active expert ids; counts (per expert, optional) rank them by tokens."""
        active = sorted(set(int(e) for e in active), key=lambda e: (counts[e] if counts else 0, e))
        act = set(active)
        misses = [e for e in active if e not in self.slot_of]
        evictable = [e for e in self.slot_of if e not in act]
        n_slab = min(len(misses), len(self.free) + len(evictable))
        to_temp, to_slab = misses[:len(misses) - n_slab], misses[len(misses) - n_slab:]
        slots = []
        for e in to_slab:
            s = self.free.pop(0) if self.free else self.slot_of.pop(evictable.pop(0))
            self.slot_of[e] = s
            slots.append(s)
        for e in active:
            if e in self.slot_of:
                self.slot_of.move_to_end(e)
        if self.stats is not None:
            self.stats["hits"] += len(active) - len(misses)
            self.stats["misses"] += len(misses)
        if to_slab:
            self.compose(to_slab, [self.slab[s] for s in slots])
        parts = [self.slab] if self.slab is not None else []
        groups = [0] * self.num_experts
        for e in active:
            if e in self.slot_of:
                groups[e] = self.slot_of[e]
        if to_temp:  # composed where used, a chunk at a time (kernels.LazyPart)
            parts.append(LazyPart(to_temp, self.compose, self.shape, self.dtype, self.device))
            for j, e in enumerate(to_temp):
                groups[e] = self.capacity + j
        if not parts:  # no active expert and no slab
            parts = [torch.empty((0, *self.shape), dtype=self.dtype, device=self.device)]
        return Blocks(parts, torch.tensor(groups, dtype=torch.int64).to(self.device), groups)

    def keys(self) -> list[int]:
        """Resident expert ids, least recently used first."""
        return list(self.slot_of)

    def clear(self) -> None:
        self.slot_of.clear()
        self.free = list(range(self.capacity))

    def reset_stats(self) -> None:
        if self.stats is not None:
            self.stats.update(hits=0, misses=0)

    def nbytes(self) -> int:
        return 0 if self.slab is None else self.slab.numel() * self.slab.element_size()


def simulate_lru(trace: Sequence[Sequence[int]], capacity: int, warmup: int = 0) -> dict[str, float]:
    """Replay a per-token routing trace (each item: the token's expert ids) through the runtime's slab
    policy (`SlabCache`, one lookup per token). The first `warmup` tokens fill the cache without being
    counted. Returns hits, misses, hit_rate."""
    n = 1 + max((int(e) for ids in trace for e in ids), default=0)
    cache = SlabCache(int(capacity), n, (1, 1), torch.float32, "cpu", lambda ids, out: None, collect_stats=True)
    for t, ids in enumerate(trace):
        if t == warmup:
            cache.reset_stats()
        cache.lookup([int(i) for i in ids])
    h, m = cache.stats["hits"], cache.stats["misses"]
    return {"hits": h, "misses": m, "hit_rate": h / max(1, h + m)}

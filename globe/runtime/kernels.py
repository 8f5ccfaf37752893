"""Compute core of a GloBE experts layer: grouped GEMMs, batched composition, an LRU slab of blocks.

Why: the per-expert Python loop costs launches and host syncs; one grouped GEMM per projection does the
same work in one call. Shapes, per MoE layer (E experts, hidden d, expert width p, block rows R):

    hidden (T, d), top_k_index (T, k) int64, top_k_weights (T, k)
    block of expert e (R, d): rows [tilde_B_gate; tilde_B_up] (R = r_gate + r_up), or with compose_full
        [A_gate tilde_B_gate; A_up tilde_B_up] (2p, d) and no A applied
    A_f (E, p, r_f) for a fitted family f; W_f (E, p, d) for a dense (unfitted) one; down (E, d, p)
    out[t] = sum_j w_tj * down_e (act(gate_e(x_t)) * up_e(x_t)),  e = top_k_index[t, j]

Paths (`experts_forward(path=...)`), all with the same elementwise work and epilogue:
  grouped  assignments sorted by expert once; block, A, dense and Down projections each one
           `grouped_mm` over the experts (device offsets from searchsorted, static shapes).
  loop     the same GEMMs as one `mm` per active expert (needs host counts: one sync).
  gather   no sort, per assignment: on CUDA each assignment gathers its expert's weights and one `bmm`
           of fixed shape runs per projection; on the CPU one `mv` per assignment, no copies.
`choose_path` picks one from (device, dtype, T*k) only, so every cache mode takes the same path and
modes agree bit for bit. Host syncs: a `full` table needs none with `gather` on CUDA, nor with
`grouped` where torch's grouped_mm is native (CUDA bf16 on compute capability 9.x/10.x; elsewhere torch
reads the offsets on the host); `loop` reads the per-expert counts; an `lru`/`none` lookup needs the
active experts on the host (one sync per layer call) to compose the misses. On the CPU torch's
grouped_mm is one mm per group, bit-identical to `loop` (tested).

Blocks: a `full` table is `Blocks([table])`; `SlabCache` keeps at most S composed blocks in one
preallocated slab (S, R, d) with an expert -> slot map and composes misses in one `compose_blocks` call
straight into their slots (S = 0: compose every call, mode `none`). `compose_many` gives each expert the
same bits whatever else is in the batch: on the CPU in chunks of fixed size (each expert's ops do not
depend on the batch); elsewhere batched elementwise ops over a prefix of experts sorted by nnz (each
element's arithmetic is independent of the batch). Never a GEMM whose blocking depends on the batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import GlobeError

FAMILIES = ("gate", "up")  # row order inside a block and inside gate_up_proj
PATHS = ("grouped", "loop", "gather")
GATHER_MAX = 8  # T*k up to which `choose_path` picks `gather` (CPU: measured; CUDA w/o native grouped: unmeasured)
_GMM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GMM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---- grouped GEMM ---------------------------------------------------------------------------------
def grouped_native(device: torch.device, dtype: torch.dtype) -> bool:
    """True when torch's grouped_mm runs here without reading offsets on the host.

    CPU: any of bf16/fp16/fp32 (a C++ loop of mm over the groups). CUDA: bf16 on compute capability
    9.x or 10.x (CUTLASS kernel, torch 2.13 `_grouped_mm_cuda`); elsewhere torch falls back to
    `offs.cpu()` and a loop of mm, one host sync per call.
    """
    if _GMM is None or dtype not in _GMM_DTYPES:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)


def _gmm_ok(a: torch.Tensor, w: torch.Tensor) -> bool:
    """grouped_mm's layout rules: same dtype, inner dims and row strides multiples of 16 bytes."""
    if _GMM is None or a.dtype != w.dtype or a.dtype not in _GMM_DTYPES or a.device.type not in ("cpu", "cuda"):
        return False
    al = 16 // a.element_size()
    return (w.stride(-1) == 1 and w.stride(-2) == w.shape[-1] and w.shape[-1] % al == 0
            and (a.device.type == "cpu" or w.data_ptr() % 16 == 0))


def _counts(offs: torch.Tensor) -> list[int]:
    ends = offs.tolist()  # host sync
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


def loop_mm(a: torch.Tensor, w: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """out[s:t] = a[s:t] @ w[g].T over consecutive row groups of sizes counts[g]: (n, K) x (G, N, K) -> (n, N)."""
    out = a.new_empty((a.shape[0], w.shape[1]))
    s = 0
    for g, c in enumerate(counts):
        if c:
            torch.mm(a[s:s + c], w[g].T, out=out[s:s + c])
            s += c
    return out


def gmm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts: Sequence[int] | None = None) -> torch.Tensor:
    """Grouped a @ w[g].T: a (n, K) rows sorted by group, w (G, N, K), offs (G,) int32 group ends.

    Uses torch's grouped_mm when its layout rules hold, else `loop_mm` (with host `counts`, or one sync
    to read offs). Rows past offs[-1] are left unset, as grouped_mm does.
    """
    al = 16 // a.element_size()
    if _gmm_ok(a, w) and a.shape[1] % al == 0:
        if a.stride(1) != 1 or a.stride(0) % al or (a.is_cuda and a.data_ptr() % 16):
            a = a.contiguous()
        return _GMM(a, w.mT, offs=offs)
    return loop_mm(a, w, _counts(offs) if counts is None else counts)


def sort_groups(keys: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of group ids (n,) -> (order (n,) int64, offs (G,) int32 cumulative ends); no host sync."""
    order = torch.argsort(keys, stable=True)
    grid = torch.arange(num_groups, device=keys.device, dtype=keys.dtype)
    offs = torch.searchsorted(keys.index_select(0, order), grid, right=True).to(torch.int32)
    return order, offs


def choose_path(device: torch.device, dtype: torch.dtype, assignments: int) -> str:
    """The path every cache mode uses for a call with `assignments` = T*k rows (modes then agree bitwise).

    CPU: `gather` (one mv per assignment) up to GATHER_MAX, `grouped` above; measured with
    benchmarks/bench_kernels.py at Qwen1.5-MoE sizes, bf16, one thread: mv beats mm at one row per
    expert, mm wins once experts get several rows (T = 4 even, T = 8 grouped). CUDA: `grouped` where
    it is native (no sync); elsewhere `gather` up to GATHER_MAX (static shapes, sync-free), `loop` above.
    """
    if device.type == "cuda" and grouped_native(device, dtype):
        return "grouped"
    if assignments <= GATHER_MAX:
        return "gather"
    return "grouped" if device.type != "cuda" and _GMM is not None else "loop"


# ---- layer weights and block sources -------------------------------------------------------------
@dataclass
class LayerWeights:
    """Resident weights of one MoE layer (everything but the composed blocks)."""

    down: torch.Tensor  # (E, d, p), output dtype
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    compute_dtype: torch.dtype
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # fitted family -> rows [lo, hi) of a block
    A: dict[str, torch.Tensor] = field(default_factory=dict)  # fitted family -> (E, p, r_f); empty if compose_full
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # unfitted family -> (E, p, d)
    compose_full: bool = False

    def __post_init__(self):
        if set(self.rows) | set(self.dense) != set(FAMILIES) or set(self.rows) & set(self.dense):
            raise ValueError(f"rows/dense: each of gate, up must be fitted or dense, got {sorted(self.rows)} "
                             f"/ {sorted(self.dense)}")
        if not self.compose_full and set(self.A) != set(self.rows):
            raise ValueError(f"A: expected adapters for {sorted(self.rows)}, got {sorted(self.A)}")

    @property
    def block_rows(self) -> int:
        return max((hi for _, hi in self.rows.values()), default=0)


@dataclass
class Blocks:
    """Where this call's blocks live: parts (G_j, R, d) whose groups are numbered consecutively.

    group_of (E,) int64 on the device and its host copy `groups` map an active expert to its group;
    both None means parts == [table (E, R, d)] indexed by expert (no host state needed).
    """

    parts: list[torch.Tensor]
    group_of: torch.Tensor | None = None
    groups: list[int] | None = None

    def block(self, e: int) -> torch.Tensor:
        g = e if self.groups is None else self.groups[e]
        for part in self.parts:
            if g < part.shape[0]:
                return part[g]
            g -= part.shape[0]
        raise GlobeError(f"expert {e}: no block in this lookup")


# ---- forward ------------------------------------------------------------------------------------
def experts_forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    lw: LayerWeights, blocks: Blocks | None, path: str = "grouped",
                    counts: Sequence[int] | None = None) -> torch.Tensor:
    """Routed experts output (T, d) in hidden's dtype; see the module docstring for the formula.

    blocks: None when no family is fitted. counts: per-expert assignment counts on the host if the
    caller has them (an `lru`/`none` lookup does); otherwise read once where needed (`loop`, or a
    grouped call over slab parts). Raises GlobeError for an unknown path.
    """
    if path not in PATHS:
        raise GlobeError(f"unknown experts path {path!r}; choose one of {', '.join(PATHS)}")
    if lw.rows and blocks is None:
        raise GlobeError("experts_forward: fitted families need blocks")
    T, d = hidden.shape
    k = top_k_index.shape[-1]
    E = lw.down.shape[0]
    cd, od = lw.compute_dtype, lw.down.dtype
    flat = top_k_index.reshape(-1)  # (n,) n = T*k
    if path == "gather":
        x = hidden.repeat_interleave(k, 0).to(cd)  # (n, d), assignment order
        if x.is_cuda:  # weights gathered on the device: static shapes, no sync
            z = torch.bmm(_gather_blocks(blocks, flat), x.unsqueeze(-1)).squeeze(-1) if lw.rows else None

            def mm(a, w):  # (n, K) x (E, N, K) gathered per assignment -> (n, N)
                return torch.bmm(w.index_select(0, flat), a.unsqueeze(-1)).squeeze(-1)
        else:  # one mv per assignment on the stored weights: no copies (mv beats mm at one row)
            ids = flat.tolist()
            z = _mv_rows(x, _ExpertView(blocks), ids) if lw.rows else None

            def mm(a, w):
                return _mv_rows(a, w, ids)
        out = _experts_tail(x, z, lw, mm)
        out = out * top_k_weights.reshape(-1, 1).to(od)
        return out.view(T, k, d).sum(dim=1).to(hidden.dtype)

    order, offs = sort_groups(flat, E)
    if path == "loop" and counts is None:
        counts = _counts(offs)
    x = None
    if path == "loop" or blocks is None or blocks.group_of is None or lw.dense:
        x = hidden.index_select(0, order // k)  # (n, d), grouped by expert
        x = x if x.dtype == cd else x.to(cd)
    z = None
    if lw.rows:
        if path == "loop":
            z = loop_mm(x, _ExpertView(blocks), counts)
        elif blocks.group_of is None:
            z = gmm(x, blocks.parts[0], offs, counts)
        else:
            z = _grouped_parts(hidden, flat, k, cd, blocks, order, counts if counts is not None else _counts(offs))

    def mm(a, w):
        return loop_mm(a, w, counts) if path == "loop" else gmm(a, w, offs, counts)
    out = _experts_tail(x, z, lw, mm)  # (n, d) in expert order
    out = out * top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(od)
    res = torch.empty((flat.numel(), d), dtype=od, device=out.device)
    res[order] = out
    return res.view(T, k, d).sum(dim=1).to(hidden.dtype)


def _experts_tail(x, z, lw: LayerWeights, mm) -> torch.Tensor:
    """A projections (or the dense family), act(gate) * up, Down: (n, d) in down's dtype."""
    proj = {}
    for f in FAMILIES:
        if f in lw.rows:
            lo, hi = lw.rows[f]
            proj[f] = z[:, lo:hi] if lw.compose_full else mm(z[:, lo:hi], lw.A[f])
        else:
            proj[f] = mm(x, lw.dense[f])
    h = lw.act_fn(proj["gate"]) * proj["up"]  # (n, p)
    return mm(h.to(lw.down.dtype), lw.down)


class _ExpertView:
    """Index expert e -> its (R, d) block, for loop_mm over a Blocks object."""

    def __init__(self, blocks: Blocks):
        self.blocks = blocks
        self.shape = (None, blocks.parts[0].shape[1])

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.blocks.block(e)


def _mv_rows(a: torch.Tensor, w, ids: Sequence[int]) -> torch.Tensor:
    """out[i] = w[ids[i]] @ a[i]: (n, K) x (E, N, K) -> (n, N), one mv per row."""
    out = a.new_empty((a.shape[0], w.shape[1]))
    for i, e in enumerate(ids):
        torch.mv(w[e], a[i], out=out[i])
    return out


def _gather_blocks(blocks: Blocks, flat: torch.Tensor) -> torch.Tensor:
    """(n, R, d): the block of each assignment; a table is indexed on the device, a slab on the host."""
    if blocks.group_of is None:
        return blocks.parts[0].index_select(0, flat)
    ids = flat.tolist()
    return torch.stack([blocks.block(e) for e in ids]) if ids else blocks.parts[0][:0]


def _grouped_parts(hidden, flat, k, cd, blocks: Blocks, order, counts) -> torch.Tensor:
    """Block projection z (n, R) in expert order, grouped over slab/temp parts (rows sorted by group)."""
    n = flat.numel()
    G = sum(p.shape[0] for p in blocks.parts)
    order_g, offs_g = sort_groups(blocks.group_of.index_select(0, flat), G)
    xg = hidden.index_select(0, order_g // k)
    if xg.dtype != cd:
        xg = xg.to(cd)
    gcounts = [0] * G
    for e, c in enumerate(counts):
        if c:
            gcounts[blocks.groups[e]] += c
    outs, g0, row0 = [], 0, 0
    for part in blocks.parts:
        G_j = part.shape[0]
        rows = sum(gcounts[g0:g0 + G_j])
        if rows:
            outs.append(gmm(xg[row0:row0 + rows], part, offs_g[g0:g0 + G_j] - row0, gcounts[g0:g0 + G_j]))
        g0, row0 = g0 + G_j, row0 + rows
    if not outs:  # no assignment at all
        return xg.new_empty((0, blocks.parts[0].shape[1]))
    zg = outs[0] if len(outs) == 1 else torch.cat(outs)
    inv = torch.empty_like(order_g)
    inv[order_g] = torch.arange(n, device=flat.device)
    return zg.index_select(0, inv.index_select(0, order))  # group order -> expert order


# ---- composition ----------------------------------------------------------------------------------
@dataclass
class BankCodes:
    """One family's bank and sparse codes (host CSR over all N experts), as composition reads them."""

    bank: torch.Tensor  # (m, r*d), compute dtype
    indptr: list[int]  # N + 1
    indices: list[int]  # nnz atom ids
    values: list[float]  # nnz code values (pruned zeros absent)
    r: int
    d: int
    gain: float = 1.0
    activation: str = "silu"
    col_scale: torch.Tensor | None = None  # (d,) fp32

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


def _activate(x: torch.Tensor, activation: str) -> None:
    if activation == "silu":
        F.silu(x, inplace=True)
    elif activation == "tanh":
        x.tanh_()
    elif activation != "identity":
        raise GlobeError(f"unknown activation {activation!r}")


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
    rd, d, g = fam.r * fam.d, fam.d, fam.gain
    acc_buf = torch.empty(C, dtype=torch.float32)
    tmp_buf = torch.empty(C, dtype=torch.float32)
    for s in range(0, rd, C):
        t = min(rd, s + C)
        acc, tmp = acc_buf[:t - s], tmp_buf[:t - s]
        for b, i in enumerate(ids):
            lo, hi = fam.indptr[i], fam.indptr[i + 1]
            if hi == lo:
                acc.zero_()
            else:
                acc.copy_(fam.bank[fam.indices[lo], s:t]).mul_(g * fam.values[lo])
                for j in range(lo + 1, hi):
                    acc.add_(tmp.copy_(fam.bank[fam.indices[j], s:t]), alpha=g * fam.values[j])
            _activate(acc, fam.activation)
            if fam.col_scale is not None:
                acc.view(-1, d).mul_(fam.col_scale)
            out[b][s // d:t // d].copy_(acc.view(-1, d))


def _compose_batched(fam: BankCodes, ids, out, base: int) -> None:
    """Experts sorted by nnz (descending): slot j updates the prefix of experts with nnz > j."""
    dev, rd, g = fam.bank.device, fam.r * fam.d, fam.gain
    nnz = [fam.indptr[i + 1] - fam.indptr[i] for i in ids]
    perm = sorted(range(len(ids)), key=lambda b: -nnz[b])  # stable
    width = max(nnz, default=0)
    idx = [[0] * len(ids) for _ in range(width)]
    coef = [[0.0] * len(ids) for _ in range(width)]
    for q, b in enumerate(perm):
        lo = fam.indptr[ids[b]]
        for j in range(nnz[b]):
            idx[j][q], coef[j][q] = fam.indices[lo + j], g * fam.values[lo + j]
    idx_t = torch.tensor(idx, dtype=torch.int64).to(dev)  # one small copy each
    coef_t = torch.tensor(coef, dtype=torch.float32).to(dev)
    mix = torch.empty((len(ids), rd), dtype=torch.float32, device=dev)
    mix[sum(1 for c in nnz if c):].zero_()  # experts without codes: phi(0)
    for j in range(width):
        nb = sum(1 for b in perm if nnz[b] > j)
        rows = fam.bank.index_select(0, idx_t[j, :nb])  # (nb, r*d)
        if j == 0:
            torch.mul(rows, coef_t[0, :nb, None], out=mix[:nb])
        else:
            mix[:nb].addcmul_(rows, coef_t[j, :nb, None])
    _activate(mix, fam.activation)
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


def build_table(compose: Callable[[list[int], Any], None], num_experts: int, shape: tuple[int, int],
                dtype: torch.dtype, device: torch.device | str, chunk: int = 8) -> torch.Tensor:
    """The `full` table (E, R, d): compose(experts, out) called on chunks of experts."""
    table = torch.empty((num_experts, *shape), dtype=dtype, device=device)
    for s in range(0, num_experts, chunk):
        ids = list(range(s, min(num_experts, s + chunk)))
        compose(ids, table[s:s + len(ids)])
    return table


class SlabCache:
    """At most S composed blocks of one layer in a preallocated slab (S, R, d), least recently used out.

    lookup(active, counts): the active experts' blocks as `Blocks`. Hits stay in their slots; misses are
    composed in one compose(experts, out) call, straight into free or evicted slots (never a slot of
    this call's own active experts); misses beyond S go to a temporary part. Recency: this call's
    experts become the most recent, touched in ascending (tokens, id), so when more than S are active
    the slab keeps the hits, then the misses with the most tokens. capacity 0 composes every call
    (mode `none`).
    """

    def __init__(self, capacity: int, num_experts: int, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device | str, compose: Callable[[list[int], Any], None], collect_stats: bool = False):
        if capacity < 0:
            raise GlobeError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity, self.num_experts, self.shape, self.compose = int(capacity), num_experts, tuple(shape), compose
        self.dtype, self.device = dtype, torch.device(device)
        self.slab = torch.empty((self.capacity, *self.shape), dtype=dtype, device=device) if capacity else None
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
        if to_temp:
            temp = torch.empty((len(to_temp), *self.shape), dtype=self.dtype, device=self.device)
            self.compose(to_temp, temp)
            for j, e in enumerate(to_temp):
                groups[e] = self.capacity + j
            parts.append(temp)
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


def active_experts(top_k_index: torch.Tensor, num_experts: int) -> tuple[list[int], list[int]]:
    """(active expert ids ascending, per-expert counts) on the host: the one sync of an lru/none call."""
    counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).tolist()
    return [e for e, c in enumerate(counts) if c], counts

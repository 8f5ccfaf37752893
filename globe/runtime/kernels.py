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

Blocks: a `full` table is `Blocks([table])`; an `lru`/`none` lookup of `globe.runtime.cache.SlabCache`
returns the slab plus a temporary part for misses beyond capacity (see cache.py for composition).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import GlobeError

FAMILIES = ("gate", "up")  # row order inside a block: that of the fused gate/up weight (compat.GATE_UP_ORDER)
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


COMPOSE_CHUNK = 8  # blocks of a LazyPart composed at a time by the grouped path (its peak: 8 blocks)
_scratch = threading.local()  # per thread: the CPU chunk buffer every LazyPart of that thread reuses


def _chunk_buffer(n: int, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (n, R, d) buffer for composing a chunk. On the CPU one buffer per thread is kept and reused by
    every layer and call (a fresh 23-46 MB tensor per call is zero-filled by the kernel page by page
    each time once malloc gives it back, benchmarks/bench_malloc.py); elsewhere the device's caching
    allocator reuses memory and a plain empty() is returned."""
    if torch.device(device).type != "cpu":
        return torch.empty((n, *shape), dtype=dtype, device=device)
    buf = getattr(_scratch, "buf", None)
    need = n * shape[0] * shape[1]
    if buf is None or buf.dtype != dtype or buf.numel() < need:
        buf = _scratch.buf = torch.empty(need, dtype=dtype)
    return buf[:need].view(n, *shape)


class LazyPart:
    """Blocks of `experts` (local ids) not composed yet: shape (G, R, d) like a part.

    Why: in `none` mode a 256-token prefill at full size activates all 60 experts of a layer, 346 MB
    of blocks composed at once; the grouped path instead composes them `chunk` at a time into one
    reused buffer and runs each chunk's GEMM before composing the next, so the peak is one chunk.
    Indexing (loop and gather paths) composes the whole part once. Each expert's block has the same
    bits either way (composition is batch independent, cache.py).
    """

    def __init__(self, experts: Sequence[int], compose: Callable, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device, chunk: int | None = None):
        self.experts, self.compose = list(experts), compose
        self.chunk = max(1, int(COMPOSE_CHUNK if chunk is None else chunk))
        self.shape = (len(self.experts), *shape)
        self.dtype, self.device = dtype, device
        self._whole: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        """Every block (G, R, d), composed on first use."""
        if self._whole is None:
            self._whole = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            if self.experts:
                self.compose(self.experts, self._whole)
        return self._whole

    def __getitem__(self, g):
        return self.materialize()[g]

    def chunks(self):
        """(first group, blocks (c, R, d)) per chunk, composed into one reused buffer (valid until the next
        chunk, of this or any LazyPart of the same thread)."""
        if self._whole is not None:
            yield 0, self._whole
            return
        buf = _chunk_buffer(min(self.chunk, self.shape[0]), self.shape[1:], self.dtype, self.device)
        for s in range(0, self.shape[0], self.chunk):
            ids = self.experts[s:s + self.chunk]
            self.compose(ids, buf[:len(ids)])
            yield s, buf[:len(ids)]


@dataclass
class Blocks:
    """Where this call's blocks live: parts (G_j, R, d) whose groups are numbered consecutively.

    A part is a tensor (a table, an lru slab) or a `LazyPart` (misses beyond the slab, composed where
    used). group_of (E,) int64 on the device and its host copy `groups` map an active expert to its
    group; both None means parts == [table (E, R, d)] indexed by expert (no host state needed).
    """

    parts: list[torch.Tensor | LazyPart]
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
                    counts: Sequence[int] | None = None, members: Sequence[int] | None = None) -> torch.Tensor:
    """Routed experts output (T, d) in hidden's dtype; see the module docstring for the formula.

    blocks: None when no family is fitted. counts: per-expert assignment counts on the host if the
    caller has them (an `lru`/`none` lookup does); otherwise read once where needed (`loop`, or a
    grouped call over slab parts). members: distinct ascending expert ids (K,) that every assignment
    routes to; a weight of lw whose first dim is not E = down.shape[0] then holds only them (row j =
    expert members[j], e.g. kept experts' gate/up (K, p, d)) while Down and the others stay indexed
    by expert: no (K, d, p) copy of Down. Raises GlobeError for an unknown path.
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
    sub = list(members) if members is not None else None
    if sub is not None and any(w.shape[0] not in (E, len(sub)) for w in lw.dense.values()):
        raise GlobeError(f"experts_forward: dense weights must hold {E} experts or the {len(sub)} members")

    def whole(w):  # w indexed by expert (else by member); with K == E both are the same index
        return sub is None or w.shape[0] == E
    if path == "gather":
        x = hidden.repeat_interleave(k, 0).to(cd)  # (n, d), assignment order
        if x.is_cuda:  # weights gathered on the device: static shapes, no sync
            z = torch.bmm(_gather_blocks(blocks, flat), x.unsqueeze(-1)).squeeze(-1) if lw.rows else None
            slot = None if sub is None else _member_slots(sub, E, flat.device).index_select(0, flat)

            def mm(a, w):  # (n, K) x (E, N, K) gathered per assignment -> (n, N)
                return torch.bmm(w.index_select(0, flat if whole(w) else slot), a.unsqueeze(-1)).squeeze(-1)
        else:  # one mv per assignment on the stored weights: no copies (mv beats mm at one row)
            ids = flat.tolist()
            z = _mv_rows(x, _ExpertView(blocks), ids) if lw.rows else None
            pos = None if sub is None else {e: j for j, e in enumerate(sub)}
            sids = None if sub is None else [pos[e] for e in ids]

            def mm(a, w):
                return _mv_rows(a, w, ids if whole(w) else sids)
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

    sub_offs = sub_counts = None
    if sub is not None:  # members' groups: the same sorted rows, every other expert's group empty
        sub_offs = offs.index_select(0, torch.tensor(sub, dtype=torch.int64, device=offs.device))
        sub_counts = None if counts is None else [counts[e] for e in sub]

    def mm(a, w):
        o, c = (offs, counts) if whole(w) else (sub_offs, sub_counts)
        return loop_mm(a, w, c) if path == "loop" else gmm(a, w, o, c)
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


def _member_slots(members: Sequence[int], E: int, device) -> torch.Tensor:
    """(E,) int64: expert -> its row among `members` (0 for the others, which no assignment routes to)."""
    slot = torch.zeros(E, dtype=torch.int64)
    slot[list(members)] = torch.arange(len(members))
    return slot.to(device)


def _gather_blocks(blocks: Blocks, flat: torch.Tensor) -> torch.Tensor:
    """(n, R, d): the block of each assignment; one resident part (a table, compact or not) is indexed on
    the device, slab parts on the host."""
    if blocks.group_of is None:
        return blocks.parts[0].index_select(0, flat)
    if len(blocks.parts) == 1 and isinstance(blocks.parts[0], torch.Tensor):
        return blocks.parts[0].index_select(0, blocks.group_of.index_select(0, flat))
    ids = flat.tolist()
    if not ids:
        p0 = blocks.parts[0]
        return torch.empty((0, *p0.shape[1:]), dtype=p0.dtype, device=p0.device)
    return torch.stack([blocks.block(e) for e in ids])


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
        pieces = part.chunks() if isinstance(part, LazyPart) else [(0, part)]
        for c0, w in pieces:  # a lazy part: one chunk composed, multiplied, then the next
            a, G_c = g0 + c0, w.shape[0]
            rows = sum(gcounts[a:a + G_c])
            if rows:
                outs.append(gmm(xg[row0:row0 + rows], w, offs_g[a:a + G_c] - row0, gcounts[a:a + G_c]))
            row0 += rows
        g0 += part.shape[0]
    if not outs:  # no assignment at all
        return xg.new_empty((0, blocks.parts[0].shape[1]))
    zg = outs[0] if len(outs) == 1 else torch.cat(outs)
    inv = torch.empty_like(order_g)
    inv[order_g] = torch.arange(n, device=flat.device)
    return zg.index_select(0, inv.index_select(0, order))  # group order -> expert order


def active_experts(top_k_index: torch.Tensor, num_experts: int) -> tuple[list[int], list[int]]:
    """(active expert ids ascending, per-expert counts) on the host: the one sync of an lru/none call."""
    counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).tolist()
    return [e for e, c in enumerate(counts) if c], counts

"""globe.runtime.kernels: every path against a float64 per-expert reference, modes and batches bit-identical."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from globe.errors import GlobeError
from globe.maps import ACTIVATIONS, get_activation
from globe.runtime.cache import BankCodes, SlabCache, build_table, compose_blocks, compose_many
from globe.runtime.kernels import (
    FAMILIES,
    PATHS,
    Blocks,
    LayerWeights,
    active_experts,
    choose_path,
    experts_forward,
    gmm,
    loop_mm,
    sort_groups,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_family(N, m, r, d, seed, activation="silu", col_scale=False, empty=(), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(N, m)
    for i in range(N):
        if i not in empty:
            nz = torch.randperm(m, generator=g)[:1 + i % 3]
            codes[i, nz] = torch.rand(len(nz), generator=g) + 0.1
    cs = torch.rand(d, generator=g) + 0.5 if col_scale else None
    return BankCodes.from_dense(torch.randn(m, r, d, generator=g), codes, gain=0.8, activation=activation,
                                col_scale=cs, dtype=dtype)


def make_layer(E=6, d=32, p=24, r=16, m=5, dtype=torch.float32, compose_full=False, dense=(), device="cpu",
               base=0, seed=0, **fam_kw):
    """Random layer: fams (global codes over base + E experts), LayerWeights, the full table, compose fn."""
    g = torch.Generator().manual_seed(seed + 100)
    fams = {f: make_family(base + E, m, r, d, seed + i, dtype=dtype, **fam_kw)
            for i, f in enumerate(FAMILIES) if f not in dense}
    for fam in fams.values():
        fam.bank = fam.bank.to(device)
        fam.col_scale = None if fam.col_scale is None else fam.col_scale.to(device)
    A = {f: (torch.randn(E, p, r, generator=g) / r**0.5).to(device, dtype) for f in fams}
    W = {f: (torch.randn(E, p, d, generator=g) / d**0.5).to(device, dtype) for f in dense}
    down = (torch.randn(E, d, p, generator=g) / p**0.5).to(device, dtype)
    width = p if compose_full else r
    rows = {f: (i * width, (i + 1) * width) for i, f in enumerate(fams)}
    lw = LayerWeights(down=down, act_fn=F.silu, compute_dtype=dtype, rows=rows, A=A, dense=W,
                      compose_full=compose_full)

    def comp(ids, out):
        compose_blocks(fams, lw, base, ids, out)
    table = build_table(comp, E, (lw.block_rows, d), dtype, device, chunk=4) if rows else None
    return fams, lw, table, comp


def ref_tilde(fam: BankCodes, i: int) -> torch.Tensor:
    """float64 tilde_B of global expert i."""
    lo, hi = fam.indptr[i], fam.indptr[i + 1]
    mix = torch.zeros(fam.r * fam.d, dtype=torch.float64)
    for j in range(lo, hi):
        mix += fam.gain * fam.values[j] * fam.bank[fam.indices[j]].double().cpu()
    out = get_activation(fam.activation).fn(mix).view(fam.r, fam.d)
    return out * fam.col_scale.double().cpu() if fam.col_scale is not None else out


def ref_forward(h, idx, w, fams, lw: LayerWeights, base=0) -> torch.Tensor:
    """Straightforward per-token, per-expert float64 reference from the codes (not from the table)."""
    T, k = idx.shape
    out = torch.zeros(T, h.shape[1], dtype=torch.float64)
    for t in range(T):
        x = h[t].double().cpu()
        for j in range(k):
            e = int(idx[t, j])
            proj = {}
            for f in FAMILIES:
                if f in fams:
                    proj[f] = lw.A[f][e].double().cpu() @ (ref_tilde(fams[f], base + e) @ x)
                else:
                    proj[f] = lw.dense[f][e].double().cpu() @ x
            out[t] += float(w[t, j]) * (lw.down[e].double().cpu() @ (F.silu(proj["gate"]) * proj["up"]))
    return out


def routing(T, E, k, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    return idx.to(device), w.to(device, dtype)


def run(lw, blocks_fn, h, idx, w, path):
    act, counts = active_experts(idx, lw.down.shape[0])
    return experts_forward(h, idx, w, lw, blocks_fn(act, counts), path, counts)


TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


# ---- grouped GEMM ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [32, 12])  # 12: not a multiple of 16 bytes in bf16 -> loop fallback
def test_gmm_equals_per_group_mm(dtype, K):
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1, 0, 7]
    a = torch.randn(sum(counts), K, generator=g).to(dtype)
    w = torch.randn(len(counts), 24, K, generator=g).to(dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    y = gmm(a, w, offs)
    s, parts = 0, []
    for e, c in enumerate(counts):
        parts.append(a[s:s + c] @ w[e].T)
        s += c
    assert torch.equal(y, torch.cat(parts))
    assert torch.equal(y, loop_mm(a, w, counts))
    # a strided view of the input (a column slice, as the A projections read z[:, lo:hi]) gives the same bits
    wide = torch.cat([torch.zeros_like(a), a], 1)
    assert torch.equal(gmm(wide[:, K:], w, offs), y)


def test_sort_groups_offsets_and_stability():
    keys = torch.tensor([3, 1, 3, 0, 1, 3, 5])
    order, offs = sort_groups(keys, 6)
    assert order.tolist() == [3, 1, 4, 0, 2, 5, 6]
    assert offs.dtype == torch.int32 and offs.tolist() == torch.bincount(keys, minlength=6).cumsum(0).tolist()


# ---- parity with the float64 reference ------------------------------------------------------------
LAYERS = {
    "fitted": {},
    "compose_full": {"compose_full": True},
    "dense_gate": {"dense": ("gate",)},
    "dense_up": {"dense": ("up",)},
    "all_dense": {"dense": ("gate", "up")},
    "col_scale_tanh": {"col_scale": True, "activation": "tanh", "base": 6},
    "unaligned": {"d": 12, "p": 10, "r": 5},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_every_path_matches_reference(layer, dtype):
    kw = LAYERS[layer]
    fams, lw, table, _ = make_layer(dtype=dtype, **kw)
    h = torch.randn(9, kw.get("d", 32), generator=torch.Generator().manual_seed(1)).to(dtype)
    idx, w = routing(9, 6, 2, seed=2, dtype=dtype)
    ref = ref_forward(h, idx, w, fams, lw, base=kw.get("base", 0))
    blocks = Blocks([table]) if table is not None else None
    for path in PATHS:
        y = experts_forward(h, idx, w, lw, blocks, path)
        assert y.dtype == dtype and y.shape == h.shape
        err = float((y.double() - ref).abs().max() / ref.abs().max())
        assert err < TOL[dtype], (path, err)


@pytest.mark.parametrize("T,k,E", [(1, 4, 6), (1, 1, 6), (5, 1, 6), (16, 3, 3)])
def test_edge_shapes_match_reference(T, k, E):
    fams, lw, table, comp = make_layer(E=E, empty=(1,))  # expert 1 has an empty codes row
    h = torch.randn(T, 32, generator=torch.Generator().manual_seed(3))
    idx, w = routing(T, E, k, seed=4)
    ref = ref_forward(h, idx, w, fams, lw)
    for path in PATHS:
        y = experts_forward(h, idx, w, lw, Blocks([table]), path)
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < 2e-5


def test_all_tokens_on_one_expert_and_empty_codes_row():
    fams, lw, table, comp = make_layer(empty=(2,))
    assert fams["gate"].indptr[3] == fams["gate"].indptr[2]
    assert torch.equal(table[2], torch.zeros_like(table[2]))  # phi(0) = 0 for silu
    h = torch.randn(7, 32, generator=torch.Generator().manual_seed(5))
    w = torch.rand(7, 1, generator=torch.Generator().manual_seed(6))
    for e in (2, 4):
        idx = torch.full((7, 1), e)
        ref = ref_forward(h, idx, w, fams, lw)
        outs = [experts_forward(h, idx, w, lw, Blocks([table]), path) for path in PATHS]
        for y in outs:
            assert torch.allclose(y.double(), ref, atol=1e-6, rtol=1e-5)
        assert torch.equal(outs[0], outs[1])


def test_empty_batch_every_mode_and_path():
    fams, lw, table, comp = make_layer()
    h, idx, w = torch.randn(0, 32), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2)
    for S in (0, 2):
        cache = SlabCache(S, 6, (lw.block_rows, 32), torch.float32, "cpu", comp)
        for path in PATHS:
            assert experts_forward(h, idx, w, lw, Blocks([table]), path).shape == (0, 32)
            assert run(lw, cache.lookup, h, idx, w, path).shape == (0, 32)


@pytest.mark.parametrize("T,k", [(1, 2), (9, 2), (16, 3)])
def test_members_read_subset_weights_and_down_in_place(T, k):
    """Weights holding only `members` (kept experts' gate (K, p, d)) next to weights indexed by expert
    (up, Down): the same output as the expert-indexed copies, on every path."""
    E, d, p, members = 7, 32, 24, [1, 4, 5]
    g = torch.Generator().manual_seed(11)
    W = {f: torch.randn(E, p, d, generator=g) / d**0.5 for f in FAMILIES}
    down = torch.randn(E, d, p, generator=g) / p**0.5
    full = LayerWeights(down=down, act_fn=F.silu, compute_dtype=torch.float32, dense=W)
    sub = LayerWeights(down=down, act_fn=F.silu, compute_dtype=torch.float32,
                       dense={"gate": W["gate"][members].clone(), "up": W["up"]})
    h = torch.randn(T, d, generator=g)
    idx = torch.tensor(members)[torch.randint(0, 3, (T, k), generator=g)]
    w = torch.rand(T, k, generator=g)
    for path in PATHS:
        want = experts_forward(h, idx, w, full, None, path)
        assert torch.equal(experts_forward(h, idx, w, sub, None, path, members=members), want), path
        with pytest.raises(GlobeError, match="members"):
            experts_forward(h, idx, w, sub, None, path, members=members[:2])


def test_compact_table_through_a_map_equals_the_whole_table():
    """A `full` table of some experts only (kept ones have no block), found through group_of: every path
    gives the whole table's bits for assignments to those experts."""
    E = 6
    fams, lw, table, comp = make_layer(E=E)
    some = [0, 2, 3, 5]
    compact = build_table(comp, some, (lw.block_rows, 32), torch.float32, "cpu", chunk=3)
    assert compact.shape[0] == len(some) and torch.equal(compact, table[some])
    row = torch.full((E,), -1, dtype=torch.int64)
    row[some] = torch.arange(len(some))
    blocks = Blocks([compact], row, row.tolist())
    g = torch.Generator().manual_seed(12)
    for T in (1, 9):
        h = torch.randn(T, 32, generator=g)
        idx = torch.tensor(some)[torch.randint(0, len(some), (T, 2), generator=g)]
        w = torch.rand(T, 2, generator=g)
        for path in PATHS:
            assert torch.equal(experts_forward(h, idx, w, lw, blocks, path),
                               experts_forward(h, idx, w, lw, Blocks([table]), path)), (path, T)


# ---- modes and paths bit-identical --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", ["fitted", "compose_full", "dense_up"])
def test_modes_bit_identical_over_a_sequence(layer, dtype):
    """full table, LRU slabs of several sizes (hits, evictions, overflow to temp) and none (S=0) agree."""
    kw = LAYERS[layer]
    E = 8
    fams, lw, table, comp = make_layer(E=E, dtype=dtype, **kw)
    calls = [routing(T, E, 2, seed=10 + s, dtype=dtype) + (T,) for s, T in enumerate([1, 1, 6, 1, 12, 1, 1, 3])]
    caches = {S: SlabCache(S, E, (lw.block_rows, 32), dtype, "cpu", comp) for S in (0, 1, 3, E)}
    for c, (idx, w, T) in enumerate(calls):
        h = torch.randn(T, 32, generator=torch.Generator().manual_seed(c)).to(dtype)
        want = {path: experts_forward(h, idx, w, lw, Blocks([table]), path) for path in PATHS}
        assert torch.equal(want["grouped"], want["loop"])  # on the CPU grouped_mm is mm per group
        for S, cache in caches.items():
            for path in PATHS:
                assert torch.equal(run(lw, cache.lookup, h, idx, w, path), want[path]), (c, S, path)
            assert len(cache.keys()) <= S


@pytest.mark.parametrize("S", [0, 2])
def test_lazy_part_is_composed_a_chunk_at_a_time_on_the_grouped_path(S, monkeypatch):
    """Misses beyond the slab (all of them in `none`) are composed `COMPOSE_CHUNK` at a time, each chunk
    multiplied before the next is composed; the result equals the full table's bit for bit."""
    import globe.runtime.kernels as K

    monkeypatch.setattr(K, "COMPOSE_CHUNK", 3)
    E = 10
    fams, lw, table, comp = make_layer(E=E)
    sizes = []

    def counting(ids, out):
        sizes.append(len(ids))
        comp(ids, out)

    cache = SlabCache(S, E, (lw.block_rows, 32), torch.float32, "cpu", counting)
    idx, w = routing(40, E, 2, seed=5)
    h = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    act, counts = active_experts(idx, E)
    assert len(act) == E  # every expert active: E - S misses go to the lazy part
    got = experts_forward(h, idx, w, lw, cache.lookup(act, counts), "grouped", counts)
    want = experts_forward(h, idx, w, lw, Blocks([table]), "grouped")
    assert torch.equal(got, want)
    assert sizes == ([3, 3, 3, 1] if S == 0 else [2, 3, 3, 2])  # with S = 2 the slab's misses come first


# ---- composition ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, *({"activation": a, "col_scale": True} for a in sorted(ACTIVATIONS))])
def test_compose_many_matches_reference_and_is_batch_independent(kw):
    fam = make_family(10, 6, 8, 64, seed=3, empty=(4,), **kw)
    single = torch.stack([compose_many(fam, [i], torch.float32)[0] for i in range(10)])
    for i in range(10):
        assert torch.allclose(single[i].double(), ref_tilde(fam, i), atol=1e-6, rtol=1e-5)
    for ids in ([9, 0, 4, 4, 7], list(range(10)), [4], [3, 1]):
        got = compose_many(fam, ids, torch.float32)
        assert torch.equal(got, single[ids])
    views = [torch.empty(8, 64) for _ in range(3)]  # writes into given slots
    compose_many(fam, [2, 5, 4], torch.float32, out=views)
    assert all(torch.equal(v, single[i]) for v, i in zip(views, [2, 5, 4]))
    bf = compose_many(fam, [0, 1], torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, single[[0, 1]].to(torch.bfloat16))


def test_compose_chunk_boundaries_do_not_change_values():
    fam = make_family(4, 5, 6, 32, seed=4)  # r*d = 192; chunks of 64 / 96 / whole
    outs = [compose_many(fam, [0, 1, 2, 3], torch.float32, chunk=c) for c in (64, 96, 10**6)]
    for o in outs:
        for i in range(4):
            assert torch.allclose(o[i].double(), ref_tilde(fam, i), atol=1e-6, rtol=1e-5)


# ---- the LRU slab -------------------------------------------------------------------------------------
def test_slab_cache_policy_worked_example():
    calls = []
    sc = SlabCache(2, 6, (1, 1), torch.float32, "cpu", lambda ids, out: calls.append(list(ids)), collect_stats=True)
    b = sc.lookup([3, 1])  # two misses into free slots 0, 1
    assert calls == [[1, 3]] and sc.keys() == [1, 3] and b.groups[1] == 0 and b.groups[3] == 1
    sc.lookup([5])  # evicts the least recent (1), reuses its slot
    assert calls[-1] == [5] and sc.keys() == [3, 5] and sc.slot_of[5] == 0
    sc.lookup([3])  # hit: no compose, 3 becomes most recent
    assert len(calls) == 2 and sc.keys() == [5, 3]
    b = sc.lookup([0, 2, 3, 4])  # 3 is kept; one slot for misses (the highest id), the rest in a lazy part
    assert sc.keys() == [3, 4] and calls[-1] == [4]
    assert len(b.parts) == 2 and b.parts[1].shape[0] == 2 and b.groups[0] == 2 and b.groups[2] == 3
    b.block(0)  # indexing composes the lazy part, once
    b.block(2)
    assert calls[-2:] == [[4], [0, 2]]
    assert sc.stats == {"hits": 2, "misses": 6}
    sc.clear()
    assert sc.keys() == [] and sc.nbytes() == 2 * 4


def test_slab_cache_keeps_the_most_used_misses_of_a_large_call():
    sc = SlabCache(2, 6, (1, 1), torch.float32, "cpu", lambda ids, out: None)
    counts = [5, 1, 9, 2, 0, 3]
    b = sc.lookup([0, 1, 2, 3, 5], counts)
    assert sc.keys() == [0, 2] and set(b.groups[e] for e in (1, 3, 5)) == {2, 3, 4}
    sc.lookup([1, 4], [0, 1, 0, 0, 1, 0])  # equal counts: ascending id, the least recent (0) goes first
    assert sc.keys() == [1, 4]


def test_bad_input():
    fams, lw, table, comp = make_layer()
    h, (idx, w) = torch.randn(2, 32), routing(2, 6, 2, seed=0)
    with pytest.raises(GlobeError, match="unknown experts path"):
        experts_forward(h, idx, w, lw, Blocks([table]), "fast")
    with pytest.raises(GlobeError, match="need blocks"):
        experts_forward(h, idx, w, lw, None)
    with pytest.raises(GlobeError, match="expert ids"):
        compose_many(fams["gate"], [6], torch.float32)
    with pytest.raises(ValueError, match="rows/dense"):
        LayerWeights(down=lw.down, act_fn=F.silu, compute_dtype=torch.float32, rows={"gate": (0, 16)})
    with pytest.raises(GlobeError, match="capacity"):
        SlabCache(-1, 6, (1, 1), torch.float32, "cpu", comp)


def test_choose_path_cpu():
    cpu = torch.device("cpu")
    assert choose_path(cpu, torch.bfloat16, 4) == "gather" and choose_path(cpu, torch.bfloat16, 64) == "grouped"


# ---- CUDA ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_paths_match_reference_and_modes_agree(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    E = 8
    fams, lw, table, comp = make_layer(E=E, dtype=dtype, device="cuda")
    caches = [SlabCache(S, E, (lw.block_rows, 32), dtype, "cuda", comp) for S in (0, 2, E)]
    for c, T in enumerate([1, 1, 7, 1, 3]):
        h = torch.randn(T, 32, generator=torch.Generator().manual_seed(c)).to("cuda", dtype)
        idx, w = routing(T, E, 2, seed=c, device="cuda", dtype=dtype)
        ref = ref_forward(h, idx, w, fams, lw)
        path = choose_path(h.device, dtype, idx.numel())
        for p in PATHS:
            y = experts_forward(h, idx, w, lw, Blocks([table]), p)
            assert float((y.double().cpu() - ref).abs().max() / ref.abs().max()) < TOL[dtype], p
        want = experts_forward(h, idx, w, lw, Blocks([table]), path)
        for cache in caches:
            assert torch.equal(run(lw, cache.lookup, h, idx, w, path), want)


@pytest.mark.gpu
@cuda
def test_cuda_compose_batched_bit_identical_to_single():
    fam = make_family(12, 6, 16, 256, seed=5, empty=(3,), col_scale=True)
    fam.bank, fam.col_scale = fam.bank.cuda(), fam.col_scale.cuda()
    single = torch.stack([compose_many(fam, [i], torch.float32)[0] for i in range(12)])
    for i in range(12):
        assert torch.allclose(single[i].double().cpu(), ref_tilde(fam, i), atol=1e-5, rtol=1e-5)
    for ids, mb in (([11, 3, 0, 5, 5], 16), (list(range(12)), 16), (list(range(12)), 5)):
        assert torch.equal(compose_many(fam, ids, torch.float32, max_batch=mb), single[ids])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_full_decode_captures_in_a_graph(dtype):
    """The chosen full-mode decode path has static shapes and no host sync: a CUDA graph captures it."""
    fams, lw, table, comp = make_layer(E=8, dtype=dtype, device="cuda")
    h = torch.randn(1, 32, device="cuda", dtype=dtype)
    idx, w = routing(1, 8, 2, seed=1, device="cuda", dtype=dtype)
    path = choose_path(h.device, dtype, idx.numel())
    blocks = Blocks([table])
    want = experts_forward(h, idx, w, lw, blocks, path)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        experts_forward(h, idx, w, lw, blocks, path)  # warm up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = experts_forward(h, idx, w, lw, blocks, path)
    idx2, w2 = routing(1, 8, 2, seed=2, device="cuda", dtype=dtype)
    idx.copy_(idx2)
    w.copy_(w2)
    graph.replay()
    assert torch.equal(out, experts_forward(h, idx, w, lw, blocks, path))
    assert not torch.equal(out, want)

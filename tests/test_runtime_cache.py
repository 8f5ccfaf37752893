"""LRU invariants, hit/miss accounting, precompose exactness and CSR codes of the runtime cache."""

from __future__ import annotations

import pytest
import torch

from globe.artifacts import Family, dense_codes, sparse_codes
from globe.errors import GlobeError
from globe.runtime.cache import SlabCache, simulate_lru
from globe.runtime.patch import store_from_family


def _counting_slab(capacity: int = 3, E: int = 8, stats: bool = True):
    calls: list[list[int]] = []

    def compose(ids, out):
        calls.append(list(ids))
        for b, e in enumerate(ids):
            out[b].fill_(float(e))

    return SlabCache(capacity, E, (2, 3), torch.float32, "cpu", compose, collect_stats=stats), calls


def test_lru_scripted_pattern_recency_and_counts():
    """One expert per call: the slab is a plain LRU of capacity 3."""
    c, calls = _counting_slab(3)
    script = [1, 2, 3, 1, 4, 2, 5, 1, 1, 3]
    # Hand-simulated: 1m 2m 3m 1h 4m(evict 2) 2m(evict 3) 5m(evict 1) 1m(evict 4) 1h 3m(evict 2)
    expect_hit = [0, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    orders = [[1], [1, 2], [1, 2, 3], [2, 3, 1], [3, 1, 4], [1, 4, 2], [4, 2, 5], [2, 5, 1], [2, 5, 1], [5, 1, 3]]
    for e, hit, order in zip(script, expect_hit, orders):
        before = c.stats["hits"]
        blocks = c.lookup([e])
        assert torch.equal(blocks.block(e), torch.full((2, 3), float(e)))  # that expert's block, not another
        assert c.stats["hits"] - before == hit
        assert c.keys() == order  # least recently used first
    assert c.stats == {"hits": 2, "misses": 8}
    assert calls == [[e] for e, h in zip(script, expect_hit) if not h]  # compose exactly on misses


def test_lru_capacity_never_exceeded_random_trace():
    c, _ = _counting_slab(5, E=20)
    g = torch.Generator().manual_seed(0)
    ref: list[int] = []  # reference LRU as a plain list
    for e in torch.randint(0, 20, (500,), generator=g).tolist():
        c.lookup([e])
        if e in ref:
            ref.remove(e)
        ref.append(e)
        ref = ref[-5:]
        assert c.keys() == ref


def test_none_mode_composes_every_call():
    none, calls = _counting_slab(0, E=4)
    for ids in ([1, 2], [1]):
        blocks = none.lookup(ids)
        assert calls[-1:] != [ids]  # composed where used, not at lookup
        assert all(torch.equal(blocks.block(e), torch.full((2, 3), float(e))) for e in ids)
    assert calls == [[1, 2], [1]] and none.stats == {"hits": 0, "misses": 3} and none.keys() == []


def test_stats_off_and_bad_mode(tiny_dirs):
    from globe.config import CacheCfg

    c, _ = _counting_slab(3, stats=False)
    c.lookup([1])
    assert c.stats is None
    with pytest.raises(ValueError, match="cache.mode"):
        CacheCfg(mode="fifo")
    model = tiny_dirs["qwen2_moe"][0]
    import copy

    from globe.runtime import patch_model
    from globe.testing.artifacts import random_artifacts
    with pytest.raises(GlobeError, match="cache mode"):
        patch_model(copy.deepcopy(model), random_artifacts(model, m=3, r=4), _bad_cache())


def _bad_cache():
    from globe.config import CacheCfg

    c = CacheCfg()
    c.mode = "fifo"  # bypasses validation, as a hand-built object could
    return c


def test_simulate_lru_counts_after_warmup():
    trace = [[0, 1], [0, 1], [2, 3], [0, 1]]
    r = simulate_lru(trace, capacity=2, warmup=1)
    # after warmup {0,1}: [0,1] hits 2; [2,3] misses 2 (evicts 0,1); [0,1] misses 2 (the slab policy,
    # one lookup per token: identical to a plain LRU when a token's experts fit the capacity)
    assert (r["hits"], r["misses"]) == (2, 4)
    assert simulate_lru(trace, capacity=4)["hits"] == 4


def test_sparse_codes_roundtrip_and_compose_matches_artifact():
    g = torch.Generator().manual_seed(1)
    codes = torch.rand(6, 5, generator=g)
    codes[codes < 0.6] = 0
    codes[2] = 0  # an expert with empty support
    indptr, idx, val = sparse_codes(codes)
    assert idx.dtype == torch.int32 and torch.equal(dense_codes(indptr, idx, val, 5), codes)
    # two banks: layer 0 (experts 0-2) uses bank 1, layer 1 (experts 3-5) bank 0
    fa = Family(bank=torch.randn(2, 5, 4, 7, generator=g), codes=codes, gain=torch.tensor([0.6, 0.9]),
                layer_bank=[1, 0], num_experts=3, activation="tanh", col_scale=torch.rand(7, generator=g) + 0.5,
                A_layers=list(torch.randn(6, 3, 4, generator=g).split(3)), p=3)
    st = store_from_family("up", fa, [0, 2], torch.float32, "cpu")
    for i in range(6):
        L, e = [0, 2][i // 3], i % 3
        want = fa.compose(torch.tensor([i]))[0]
        torch.testing.assert_close(st.compose(L, e, torch.float32), want, rtol=1e-6, atol=1e-6)
        bank = fa.bank[fa.layer_bank[i // 3]].reshape(5, -1)  # independent: dense codes @ bank
        ref = torch.tanh(float(fa.gain[fa.layer_bank[i // 3]]) * (codes[i] @ bank)).reshape(4, 7) * fa.col_scale
        torch.testing.assert_close(want, ref, rtol=1e-6, atol=1e-6)
    st.release_bank()
    with pytest.raises(GlobeError, match="released"):
        st.compose(0, 0, torch.float32)

"""LRU invariants, hit/miss accounting, precompose exactness and CSR codes of the runtime cache."""

from __future__ import annotations

import pytest
import torch

from globe.artifacts import Family, dense_codes, sparse_codes
from globe.errors import GlobeError
from globe.runtime.cache import ExpertCache, simulate_lru
from globe.runtime.patch import store_from_family


def _counting_cache(mode: str, capacity: int = 3, stats: bool = True, E: int = 8):
    calls: list[int] = []

    def compose(e: int) -> torch.Tensor:
        calls.append(e)
        return torch.full((2, 3), float(e))

    return ExpertCache(mode, E, compose, capacity=capacity, collect_stats=stats), calls


def test_lru_scripted_pattern_recency_and_counts():
    c, calls = _counting_cache("lru", capacity=3)
    script = [1, 2, 3, 1, 4, 2, 5, 1, 1, 3]
    # Hand-simulated: 1m 2m 3m 1h 4m(evict 2) 2m(evict 3) 5m(evict 1) 1m(evict 4) 1h 3m(evict 2)
    expect_hit = [0, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    orders = [[1], [1, 2], [1, 2, 3], [2, 3, 1], [3, 1, 4], [1, 4, 2], [4, 2, 5], [2, 5, 1], [2, 5, 1], [5, 1, 3]]
    for e, hit, order in zip(script, expect_hit, orders):
        before = list(c.stats.values())
        blk = c.get(e)
        assert torch.equal(blk, torch.full((2, 3), float(e)))  # the block of that expert, not another
        assert c.stats["hits"] - before[0] == hit
        assert len(c.lru) <= 3
        assert c.keys() == order  # least recently used first
    assert c.stats == {"hits": 2, "misses": 8}
    assert calls == [e for e, h in zip(script, expect_hit) if not h]  # compose exactly on misses


def test_lru_capacity_never_exceeded_random_trace():
    c, _ = _counting_cache("lru", capacity=5, E=20)
    g = torch.Generator().manual_seed(0)
    ref: list[int] = []  # reference LRU as a plain list
    for e in torch.randint(0, 20, (500,), generator=g).tolist():
        c.get(e)
        if e in ref:
            ref.remove(e)
        ref.append(e)
        ref = ref[-5:]
        assert len(c.lru) <= 5 and c.keys() == ref


def test_full_and_none_modes():
    full, calls = _counting_cache("full", E=4)
    full.build_table()
    assert calls == [0, 1, 2, 3]  # all precomposed at once
    assert torch.equal(full.get(2), torch.full((2, 3), 2.0)) and calls == [0, 1, 2, 3]
    none, calls = _counting_cache("none", E=4)
    none.get_many([1, 1, 2])
    assert calls == [1, 1, 2] and none.stats == {"hits": 0, "misses": 3}


def test_stats_off_by_default_and_bad_mode():
    c, _ = _counting_cache("lru", stats=False)
    c.get(1)
    assert c.stats is None
    with pytest.raises(GlobeError, match="cache mode"):
        ExpertCache("fifo", 4, lambda e: torch.zeros(1))


def test_simulate_lru_counts_after_warmup():
    trace = [[0, 1], [0, 1], [2, 3], [0, 1]]
    r = simulate_lru(trace, capacity=2, warmup=1)
    # after warmup {0,1}: [0,1] hits 2; [2,3] misses 2 (evicts 0,1); [0,1] misses 2
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
        want = fa.mixed(torch.tensor([i]))[0]
        torch.testing.assert_close(st.compose(L, e, torch.float32), want, rtol=1e-6, atol=1e-6)
        bank = fa.bank[fa.layer_bank[i // 3]].reshape(5, -1)  # independent: dense codes @ bank
        ref = torch.tanh(float(fa.gain[fa.layer_bank[i // 3]]) * (codes[i] @ bank)).reshape(4, 7) * fa.col_scale
        torch.testing.assert_close(want, ref, rtol=1e-6, atol=1e-6)
    st.release_bank()
    with pytest.raises(GlobeError, match="released"):
        st.compose(0, 0, torch.float32)

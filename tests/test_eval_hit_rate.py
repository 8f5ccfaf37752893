"""LRU hit-rate simulator against hand-computed traces, and routing capture against the router."""

from __future__ import annotations

import pytest
import torch

from globe.errors import GlobeError
from globe.eval.hit_rate import hit_rate_curve, lru_replay, record_routing
from globe.testing.models import tiny_model


def test_lru_hand_trace():
    trace = [[0], [1], [0], [2], [1]]
    # S=2: 0 miss, 1 miss, 0 hit (0 now most recent), 2 miss evicts 1, 1 miss. FIFO would hit the last one.
    assert lru_replay(trace, 2) == (1, 5)
    assert lru_replay(trace, 1) == (0, 5)
    assert lru_replay(trace, 3) == (2, 5)  # only compulsory misses
    assert lru_replay(trace, 2, warmup=2) == (1, 3)  # 0 hit, 2 miss, 1 miss counted


def test_lru_topk_trace():
    trace = [[0, 1], [2, 0], [1, 2], [0, 1]]
    # S=3 keeps everything after the first 3 compulsory misses: 8 accesses, 5 hits
    assert lru_replay(trace, 3) == (5, 8)
    # S=2, the runtime's policy (a token's experts are looked up together; its hits are never evicted by
    # its own misses): {0,1} 2 misses; {2,0}: 0 hit, 2 evicts 1; {1,2}: 2 hit, 1 evicts 0; {0,1}: 1 hit,
    # 0 evicts 2 -> 3 hits. (A sequential per-access LRU would evict each token's own experts: 0 hits.)
    assert lru_replay(trace, 2) == (3, 8)
    with pytest.raises(GlobeError):
        lru_replay(trace, 0)


def test_routing_trace_matches_router_and_curve_is_monotone():
    model = tiny_model("qwen2_moe", seed=1)
    ids = torch.randint(3, 96, (70,), generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = [model.model.layers[L].mlp.gate.register_forward_hook(
        lambda m, a, out, L=L: seen.setdefault(L, []).append(out[2])) for L in (0, 2)]
    traces = record_routing(model, ids, context=32)
    for h in hooks:
        h.remove()
    assert sorted(traces) == [0, 2]  # layer 1 is dense (mlp_only_layers)
    for L, tr in traces.items():
        assert tr.shape == (70, 2)
        assert torch.equal(tr, torch.cat(seen[L]))
    E = 6
    curve = hit_rate_curve(traces, [1, 2, 3, 4, 6, 8])
    rates = curve["hit_rate"]
    assert all(a <= b + 1e-12 for a, b in zip(rates, rates[1:]))  # LRU is a stack algorithm
    distinct = sum(len(set(t.flatten().tolist())) for t in traces.values())
    assert rates[-1] == pytest.approx(1 - distinct / (2 * 70 * 2))  # S >= E: compulsory misses only
    assert rates[-2] == rates[-1] and E == 6

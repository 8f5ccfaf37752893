"""LRU cache hit rate of composed experts versus cache size S, from real routing traces.

Why simulate: the runtime's LRU mode keeps at most S composed tilde_B_i per MoE layer; a miss costs a
compose (nnz(alpha) * r * d). The hit rate depends only on which experts the router picks, so we
record the routing of the model on real text once and replay it through per-layer LRU caches of
every S. Replay is token by token in text order (the decode access pattern); each token touches its
top-k experts in router order.

Shapes: trace[layer] is a (T, k) LongTensor of selected expert ids, T tokens in text order.
Hit rate = hits / accesses over all MoE layers, after an optional warmup of W tokens that fill the
caches but are not counted (the runtime warms its cache on calibration text the same way).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..errors import GlobeError


def lru_replay(trace: Iterable[Sequence[int]], S: int, warmup: int = 0) -> tuple[int, int]:
    """Replay per-token expert lists through one LRU cache of capacity S -> (hits, accesses).

    The first `warmup` tokens update the cache but are not counted.
    """
    if int(S) < 1:
        raise GlobeError(f"cache size S must be >= 1, got {S}")
    from ..runtime.cache import simulate_lru  # the runtime's own LRU, so the figure is what it would do

    r = simulate_lru(trace if isinstance(trace, list) else list(trace), int(S), warmup)
    return int(r["hits"]), int(r["hits"] + r["misses"])


def hit_rate_curve(traces: dict[int, torch.Tensor], S_values: Sequence[int], warmup: int = 0) -> dict:
    """Hit rate for each S, pooled over layers: {S: rate}, plus per-layer rates under 'per_layer'."""
    if not traces:
        raise GlobeError("no routing traces recorded (is this a MoE model?)")
    out: dict = {"S": [int(s) for s in S_values], "hit_rate": [], "per_layer": {}}
    for S in S_values:
        h_all = a_all = 0
        for layer, tr in traces.items():
            h, a = lru_replay(tr.tolist(), int(S), warmup)
            h_all, a_all = h_all + h, a_all + a
            out["per_layer"].setdefault(str(layer), []).append(h / a if a else float("nan"))
        out["hit_rate"].append(h_all / a_all if a_all else float("nan"))
    return out


@torch.no_grad()
def record_routing(model, ids: torch.Tensor, context: int = 512) -> dict[int, torch.Tensor]:
    """Run ids (T,) through the model in consecutive windows; {layer: (T, k) expert ids}.

    Uses compat.record_routing (hooks on each MoE layer's experts call), so patched GloBE layers,
    which keep that call signature, are traced the same way.
    """
    from .. import compat

    device = compat.model_device(model)
    ids = ids.reshape(-1)
    compat.canonical_lm_head_input(model)  # logits of the last position without torch's weight copy
    with compat.record_routing(model) as trace:
        for b in range(0, ids.numel(), int(context)):
            model(input_ids=ids[b:b + int(context)].unsqueeze(0).to(device), use_cache=False, logits_to_keep=1)
    return {L: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) if v else torch.empty(0, 0, dtype=torch.long)
            for L, v in trace.items()}

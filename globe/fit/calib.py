"""Activation-aware objective: whitening from a calibration pass over a text.

The objective ||(W_i - W_hat_i) L||^2 with L L^T = C, the (regularised) covariance of the inputs
that reach expert i: either its MoE layer's input (default) or only the tokens the router sends to
that expert (`train.calib_per_expert`; shrunk toward the layer's covariance with a prior weight
of d tokens). C is regularised, C + delta * (tr C / d) I, then scaled to
unit mean diagonal, so the Cholesky factor always exists. Experts that receive no calibration token
fall back to L = I (the weight-only objective), never NaN. Shapes: covariance (d, d) per layer or
per expert; `whitener(...)` returns a function idx (n,) -> L (n, d, d).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..errors import GlobeError
from ..io.checkpoint import Checkpoint
from ..maps import get_activation
from ..progress import Progress, log
from .init import quiet

if TYPE_CHECKING:
    from ..config import GlobeConfig


def regularised_factor(C: torch.Tensor, delta: float = 1e-2) -> torch.Tensor:
    """Lower Cholesky factor of C + delta * mean(diag C) I, normalised to unit mean diagonal."""
    d = C.shape[-1]
    C = C.double()
    tr = C.diagonal().mean()
    if not torch.isfinite(tr) or float(tr) <= 0:
        return torch.eye(d)
    C = (C + delta * tr * torch.eye(d, dtype=C.dtype)) / ((1 + delta) * tr)
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        return torch.eye(d)
    return L.float()


CHARS_PER_TOKEN = 8  # first guess of the prefix calib_ids tokenizes (English BPE gives about 4 per token)


def calib_ids(ck: Checkpoint, text: str | Path, n_tokens: int, margin: int = 64) -> torch.Tensor:
    """Token ids (t,) of the first n_tokens of `text`, with the checkpoint's own tokenizer.

    Only a prefix of the text is tokenized (a calibration corpus may be far longer than n_tokens): one
    that ends at a line end and yields at least n_tokens + margin tokens, doubled until it does or is the
    whole text, so the tokens kept lie well before the cut and equal those of the whole text (the cut can
    only change the tokens of its last words; tests/test_fit_calib.py compares with the whole text).
    """
    from .. import compat
    from ..io.text import load_text

    body = load_text(text, "calibration text")
    tok = compat.load_tokenizer(ck.dir, "calibration")
    size = max(64, int(CHARS_PER_TOKEN * (n_tokens + margin)))  # characters of the first prefix tried
    while True:
        end = len(body) if size >= len(body) else (body.rfind("\n", 0, size) + 1 or size)
        ids = tok(body[:end], return_tensors="pt", verbose=False)["input_ids"][0]  # no "longer than"
        # warning: the text is cut into windows of train.calib_tokens / context, never fed whole
        if end >= len(body) or ids.numel() >= n_tokens + margin:
            break
        size *= 2
    ids = ids[:n_tokens]
    if ids.numel() < 2:
        raise GlobeError(f"calibration text {text} has fewer than 2 tokens")
    return ids


def _calib_pass(ck: Checkpoint, text: str | Path, n_tokens: int, context: int, make_hook,
                progress: bool | None = None) -> None:
    """Run the model over the first n_tokens of `text` (sequences of `context` tokens), ONE DECODER LAYER
    AT A TIME; make_hook(layer, experts) returns a function (x (t, d), top_k_index (t, k), top_k_weights
    (t, k)) called with what the router hands each MoE layer's experts module, so routing is the model's
    own (score-correction biases, group limits) and never recomputed.

    Sequential onloading (as llm-compressor's sequential pipeline): the model skeleton sits on the meta
    device; the token embeddings are looked up, the model's own forward records what each decoder layer
    receives (masks, rotary embeddings; `compat.layer_inputs`), then each layer up to the last MoE layer
    is built from the checkpoint in fp32, run on every calibration sequence and freed. The final norm and
    lm_head are never needed. Peak memory: one decoder layer in fp32 (2.3 GB for Qwen1.5-MoE-A2.7B) and what
    the allocator keeps of the previous one, the embedding table while the ids are embedded (once), and
    the hidden states (n_tokens x d fp32): measured 1.41 GB above the process's base for a 0.76 GB layer,
    against 6.6 GB for the whole 4-layer model (benchmarks/bench_calib_memory.py). The result equals
    running the whole model bitwise (tests/test_fit_calib.py checks it against from_pretrained).
    """
    from .. import compat

    ids = calib_ids(ck, text, n_tokens)
    model = compat.empty_model(compat.load_config(ck.dir), torch.float32)
    emb = compat.embed_inputs(model, ck, ids)  # (1, t, d): the embedding table is read once
    seqs = [slice(a, a + context) for a in range(0, ids.numel(), context)]
    last = max(ck.moe_layers)
    hidden, calls = [], []
    for sq in seqs:
        h0, rec = compat.layer_inputs(model, emb[:, sq].clone(), last)
        hidden.append(h0)
        calls.append(rec)
    del emb

    def wrap(fn):
        def pre(_mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            top = args[1] if len(args) > 1 else kwargs["top_k_index"]
            w = args[2] if len(args) > 2 else kwargs.get("top_k_weights")
            x = x.reshape(-1, x.shape[-1])
            fn(x, top.reshape(x.shape[0], -1), None if w is None else w.reshape(x.shape[0], -1))
        return pre

    moe = set(ck.moe_layers)
    n_w = len(ck.moe_layers) * ck.num_experts * 3 * ck.p * ck.hidden_size  # routed weights to read and run
    with Progress(last + 1, "calibration", "layers", bar=progress, quiet=quiet(n_w)) as pg:
        for L in range(last + 1):
            layer = compat.load_layer(model, ck, L, torch.float32)
            hook = None
            if L in moe:
                ex = compat.get_experts(model, L)
                hook = ex.register_forward_pre_hook(wrap(make_hook(L, ex)), with_kwargs=True)
            try:
                for j in range(len(seqs)):
                    hidden[j] = compat.run_layer(layer, hidden[j], calls[j][L])
                    pg.update(1 / len(seqs))
            finally:
                if hook is not None:
                    hook.remove()
                compat.unload_layer(model, L)


class _Covariances:
    """Collects {layer: sum x x^T, count} and, per expert, the same over the tokens routed to it."""

    def __init__(self, ck: Checkpoint, per_expert: bool):
        self.d, self.E, self.per_expert = ck.hidden_size, ck.num_experts, per_expert
        self.cov = {L: torch.zeros(self.d, self.d, dtype=torch.float64) for L in ck.moe_layers}
        self.cnt = {L: 0 for L in ck.moe_layers}
        self.pe: dict[tuple[int, int], tuple] = {}

    def make(self, L, _experts):
        def hook(x, top, _w=None):
            x = x.double()
            self.cov[L] += x.T @ x
            self.cnt[L] += x.shape[0]
            if self.per_expert:
                for e in range(self.E):
                    sel = (top == e).any(-1)
                    if sel.any():
                        xs = x[sel]
                        c, n = self.pe.get((L, e), (torch.zeros(self.d, self.d, dtype=torch.float64), 0))
                        self.pe[(L, e)] = (c + xs.T @ xs, n + xs.shape[0])
        return hook

    def result(self) -> tuple[dict, dict]:
        covs = {L: self.cov[L] / max(self.cnt[L], 1) for L in self.cov}
        per = {key: (c / max(n, 1), n) for key, (c, n) in self.pe.items()}
        return covs, per


class _RowWeights:
    """Collects E[silu(g)^2], E[(u silu'(g))^2] per hidden unit of each expert and ||Down[:, j]||^2."""

    def __init__(self, ck: Checkpoint):
        self.ck, self.E, self.p = ck, ck.num_experts, ck.p
        N = len(ck.moe_layers) * self.E
        self.acc = {f: torch.zeros(N, self.p, dtype=torch.float64) for f in ("up", "gate")}
        self.cnt = torch.zeros(N)
        self.dn = torch.zeros(N, self.p, dtype=torch.float64)

    def make(self, L, ex):
        from .. import compat

        li, E = self.ck.moe_layers.index(L), self.E
        for e in range(E):  # ||Down[:, j]||^2 (p,) per expert, from the loaded layer (no (E, d, p) temporaries)
            self.dn[li * E + e] = ex.down_proj[e].detach().pow(2).sum(0, dtype=torch.float64)

        silu = get_activation("silu")  # the experts' own SwiGLU activation (every registry architecture)

        def hook(x, top, _w=None):
            x = x.float()
            for e in range(E):
                sel = (top == e).any(-1)
                if not sel.any():
                    continue
                out = x[sel] @ compat.gate_up_weight(ex)[e].float().T  # (t, 2p): fused gate/up outputs
                g, u = (compat.family_rows(out.T, f).T for f in ("gate", "up"))  # (t, p) each
                dsilu = silu.grad(g)
                i = li * E + e
                self.acc["up"][i] += (silu.fn(g) ** 2).sum(0).double()
                self.acc["gate"][i] += ((u * dsilu) ** 2).sum(0).double()
                self.cnt[i] += int(sel.sum())
        return hook

    def result(self) -> dict[str, torch.Tensor]:
        out = {}
        for f, a in self.acc.items():
            w = a / self.cnt.clamp_min(1)[:, None] * self.dn
            w = w / w.mean(1, keepdim=True).clamp_min(1e-30)
            w[self.cnt == 0] = 1.0
            out[f] = w.float()
        return out


class _Counts:
    """Routed-token count of every expert (N,), layer-major: how often the router picks it (top-k slots); and
    its gate mass sum_t g_ti^2 over those slots (g = the routing weight the MoE block scales the expert's
    output by, as the router hands it to the experts module: the model's own normalisation)."""

    def __init__(self, ck: Checkpoint):
        self.ck, self.E = ck, ck.num_experts
        self.n = torch.zeros(len(ck.moe_layers) * self.E, dtype=torch.float64)
        self.mass = torch.zeros_like(self.n)

    def make(self, L, _experts):
        li, E = self.ck.moe_layers.index(L), self.E

        def hook(_x, top, w=None):
            flat = top.reshape(-1).long()
            self.n[li * E:(li + 1) * E] += torch.bincount(flat, minlength=E)[:E].double()
            if w is not None:
                self.mass[li * E:(li + 1) * E].index_add_(0, flat, w.reshape(-1).double() ** 2)
        return hook

    def result(self) -> torch.Tensor:
        return self.n.clone()


def routing_weights(counts: torch.Tensor, power: float) -> torch.Tensor:
    """Per-expert weights (N,) fp32 of the fit's objective from routed-token counts (N,):
    w_i = (max(n_i, 1) / mean_j max(n_j, 1)) ^ power (fit_family rescales them to mean one over the live
    experts): never zero (an expert the calibration text never reaches keeps a small weight and is still
    fitted). The expected output error of
    expert i is its routed tokens times its per-token error, so power 1 weighs the relative weight error by
    its first-order share of the layer's output error; power 0.5 (default) hedges against counts from a
    short or off-domain calibration text (measured on fixture 2: benchmarks/bench_fit2.py, part `routing`).
    """
    n = counts.double().clamp_min(1.0)
    return (n / n.mean()).pow(float(power)).float()


def _both(*collectors):
    def make(L, ex):
        hooks = [c.make(L, ex) for c in collectors if c is not None]

        def hook(x, top, w=None):
            for h in hooks:
                h(x, top, w)
        return hook
    return make


def input_covariances(ck: Checkpoint, text: str | Path, n_tokens: int = 4096, per_expert: bool = False,
                      context: int = 256, progress: bool | None = None) -> tuple[dict, dict]:
    """Run the model over the text; return {layer: C (d, d)} and {(layer, e): (C, n_tokens)} if per_expert."""
    c = _Covariances(ck, per_expert)
    _calib_pass(ck, text, n_tokens, context, c.make, progress)
    return c.result()


def row_weights(ck: Checkpoint, text: str | Path, n_tokens: int = 4096, context: int = 256,
                progress: bool | None = None) -> dict[str, torch.Tensor]:
    """How much each hidden unit's error reaches the expert's output: {'up': (N, p), 'gate': (N, p)}.

    Expert output = Down (silu(g) * u) with g = Gate x, u = Up x. An error e_j in row j of Up moves the
    output by Down[:, j] silu(g_j) e_j x, so row j of Up weighs E[silu(g_j)^2] ||Down[:, j]||^2; a Gate row
    weighs E[(u_j silu'(g_j))^2] ||Down[:, j]||^2 (expectations over the tokens routed to the expert).
    Each expert's weights are scaled to mean 1; experts without tokens get all ones.
    """
    rw = _RowWeights(ck)
    _calib_pass(ck, text, n_tokens, context, rw.make, progress)
    return rw.result()


def routing_counts(ck: Checkpoint, text: str | Path, n_tokens: int = 4096, context: int = 256,
                   progress: bool | None = None) -> torch.Tensor:
    """Routed-token count (N,) float64 of every expert over the first n_tokens of `text`, layer-major."""
    c = _Counts(ck)
    _calib_pass(ck, text, n_tokens, context, c.make, progress)
    return c.result()


class Stats(NamedTuple):
    """What one calibration pass collected (None where not asked for); see calibration_stats."""

    covs: dict | None  # {layer: C (d, d)}
    per: dict | None  # {(layer, e): (C (d, d), tokens)}
    rows: dict[str, torch.Tensor] | None  # {'up'|'gate': (N, p)}
    counts: torch.Tensor | None  # (N,) float64 routed slots
    mass: torch.Tensor | None  # (N,) float64 gate mass sum_t g_ti^2 (with counts)


def calibration_stats(ck: Checkpoint, text: str | Path, n_tokens: int = 4096, per_expert: bool = False,
                      rows: bool = False, context: int = 256, progress: bool | None = None, covariances: bool = True,
                      counts: bool = False) -> Stats:
    """`input_covariances` (if covariances), `row_weights` (if rows), `routing_counts` and the gate mass (if
    counts) from ONE layer-wise pass."""
    c = _Covariances(ck, per_expert) if covariances else None
    rw = _RowWeights(ck) if rows else None
    n = _Counts(ck) if counts else None
    _calib_pass(ck, text, n_tokens, context, _both(c, rw, n), progress)
    covs, per = c.result() if c is not None else (None, None)
    return Stats(covs, per, rw.result() if rw is not None else None, n.result() if n is not None else None,
                 n.mass.clone() if n is not None else None)


def whitener(ck: Checkpoint, covs: dict[int, torch.Tensor], per: dict | None = None, per_expert: bool = False,
             min_tokens: int = 1):
    """idx (n,) -> L (n, d, d) in the artifact's layer-major expert order."""
    E, d = ck.num_experts, ck.hidden_size
    Ls = torch.stack([regularised_factor(covs[L]) for L in ck.moe_layers])  # (layers, d, d)
    if per_expert:
        eye, per = torch.eye(d), per or {}

        def one(L, e):  # shrink a few-token covariance toward its layer's (prior weight: d tokens)
            if (L, e) not in per or per[(L, e)][1] < min_tokens:
                return eye  # no token: weight-only objective
            c, n = per[(L, e)]
            return regularised_factor((n * c + d * covs[L]) / (n + d))
        Le = torch.stack([one(L, e) for L in ck.moe_layers for e in range(E)])  # (N, d, d)
        return lambda idx: Le[idx.cpu()]
    return lambda idx: Ls[(idx.cpu() // E)]


def calibrated(cfg: GlobeConfig) -> bool:
    """Whether the fit reads cfg.train.calib_text (activation objective, routing weights, or kept experts)."""
    return (cfg.train.objective == "activation" or cfg.train.expert_weights == "routing"
            or float(cfg.bank.keep_fraction) > 0)


class Calibration(NamedTuple):
    """What the fit takes from its calibration pass (None / [] where the config asks for nothing)."""

    whiten: Callable | None  # expert idx (n,) -> whitening factors (activation objective)
    rows: dict[str, torch.Tensor] | None  # {family: row weights (N, p)}
    weights: torch.Tensor | None  # (N,) expert weights (train.expert_weights=routing)
    stats: dict | None  # their summary record
    kept: list[int]  # global ids of the experts kept uncompressed (bank.keep_fraction), ascending
    keep_stats: dict | None  # what the kept experts carry (summary.json "keep")


def calibration(cfg: GlobeConfig, ck: Checkpoint, progress: bool | None = None) -> Calibration:
    """One calibration pass over train.calib_text: whitening for the activation objective, routed-token
    counts for train.expert_weights=routing, the gate mass ranking of bank.keep_fraction (keep_busiest)."""
    from ..artifacts import kept_count
    from ..io.exportmeta import kept_by_layer
    from .keep import keep_busiest

    tr = cfg.train
    act, routing = tr.objective == "activation", tr.expert_weights == "routing"
    K = kept_count(cfg.bank.keep_fraction, len(ck.moe_layers) * ck.num_experts)
    if not (act or routing or K):
        return Calibration(None, None, None, None, [], None)
    st = calibration_stats(ck, tr.calib_text, tr.calib_tokens, tr.calib_per_expert, act and tr.calib_row_weights,
                           progress=progress, covariances=act, counts=routing or K > 0)
    whiten = whitener(ck, st.covs, st.per, tr.calib_per_expert) if act else None
    kept, keep_stats = [], None
    if K:
        kept = keep_busiest(st.mass, K)
        by_layer = kept_by_layer(kept, ck.moe_layers, ck.num_experts)
        mass, counts = st.mass, st.counts
        keep_stats = {"kept": K, "fraction": float(cfg.bank.keep_fraction), "by": "gate_mass",
                      "gate_mass_share": float(mass[kept].sum() / mass.sum().clamp_min(1e-300)),
                      "routed_slot_share": float(counts[kept].sum() / counts.sum().clamp_min(1e-300)),
                      "experts_per_layer": [len(by_layer.get(L, [])) for L in ck.moe_layers]}
        log("keep: the %d busiest of %d experts (bank.keep_fraction=%g) stay uncompressed: %.1f%% of the gate "
            "mass, %.1f%% of the routed slots of the calibration text", K, mass.numel(), cfg.bank.keep_fraction,
            100 * keep_stats["gate_mass_share"], 100 * keep_stats["routed_slot_share"])
    if not routing:
        return Calibration(whiten, st.rows, None, None, kept, keep_stats)
    counts = st.counts
    w = routing_weights(counts, tr.expert_weight_power)
    shown = w.double() / w.double().mean()  # as the fit uses them: mean one (over the live experts there)
    stats = {"kind": "routing", "power": float(tr.expert_weight_power), "routed_tokens": int(counts.sum()),
             "count_min": int(counts.min()), "count_median": float(counts.median()), "count_max": int(counts.max()),
             "experts_without_tokens": int((counts == 0).sum()), "weight_min": float(shown.min()),
             "weight_max": float(shown.max())}
    stats["calib_tokens"] = int(counts.sum()) // max(1, ck.top_k * len(ck.moe_layers))
    log("expert weights: routed-token counts over %d calibration tokens: min %d, median %.0f, max %d, never "
         "routed: %d of %d experts; weights (mean one) %.3f..%.3f (power %g)", stats["calib_tokens"],
         stats["count_min"], stats["count_median"], stats["count_max"], stats["experts_without_tokens"],
         counts.numel(), stats["weight_min"], stats["weight_max"], tr.expert_weight_power)
    return Calibration(whiten, st.rows, w, stats, kept, keep_stats)

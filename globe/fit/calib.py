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

from pathlib import Path

import torch

from ..errors import GlobeError
from ..io.checkpoint import Checkpoint


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


def _calib_pass(ck: Checkpoint, text: str | Path, n_tokens: int, context: int, make_hook) -> None:
    """Run the model over the first n_tokens of `text`; make_hook(layer, experts) returns a function
    (x (t, d), top_k_index (t, k)) called with what the router hands each MoE layer's experts module,
    so routing is the model's own (score-correction biases, group limits) and never recomputed."""
    text = Path(text)
    if not text.is_file():
        raise GlobeError(f"calibration text not found: {text}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import compat

    try:
        tok = AutoTokenizer.from_pretrained(ck.dir)
    except Exception as e:  # missing tokenizer files
        raise GlobeError(f"cannot load a tokenizer from {ck.dir} for calibration: {type(e).__name__}") from None
    ids = tok(text.read_text(), return_tensors="pt")["input_ids"][0][:n_tokens]
    if ids.numel() < 2:
        raise GlobeError(f"calibration text {text} has fewer than 2 tokens")
    model = AutoModelForCausalLM.from_pretrained(ck.dir, dtype=torch.float32).eval()

    def wrap(fn):
        def pre(_mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            top = args[1] if len(args) > 1 else kwargs["top_k_index"]
            x = x.reshape(-1, x.shape[-1])
            fn(x, top.reshape(x.shape[0], -1))
        return pre

    hooks = []
    for L in ck.moe_layers:
        ex = compat.get_experts(model, L)
        hooks.append(ex.register_forward_pre_hook(wrap(make_hook(L, ex)), with_kwargs=True))
    try:
        with torch.no_grad():
            for a in range(0, ids.numel(), context):
                model(ids[a:a + context][None])
    finally:
        for h in hooks:
            h.remove()


def input_covariances(ck: Checkpoint, text: str | Path, n_tokens: int = 4096, per_expert: bool = False,
                      context: int = 256) -> tuple[dict, dict]:
    """Run the model over the text; return {layer: C (d, d)} and {(layer, e): (C, n_tokens)} if per_expert."""
    d, E = ck.hidden_size, ck.num_experts
    cov = {L: torch.zeros(d, d, dtype=torch.float64) for L in ck.moe_layers}
    cnt = {L: 0 for L in ck.moe_layers}
    pe: dict[tuple[int, int], tuple] = {}

    def make(L, _experts):
        def hook(x, top):
            x = x.double()
            cov[L] += x.T @ x
            cnt[L] += x.shape[0]
            if per_expert:
                for e in range(E):
                    sel = (top == e).any(-1)
                    if sel.any():
                        xs = x[sel]
                        c, n = pe.get((L, e), (torch.zeros(d, d, dtype=torch.float64), 0))
                        pe[(L, e)] = (c + xs.T @ xs, n + xs.shape[0])
        return hook

    _calib_pass(ck, text, n_tokens, context, make)
    covs = {L: cov[L] / max(cnt[L], 1) for L in cov}
    per = {key: (c / max(n, 1), n) for key, (c, n) in pe.items()}
    return covs, per


def row_weights(ck: Checkpoint, text: str | Path, n_tokens: int = 4096, context: int = 256) -> dict[str, torch.Tensor]:
    """How much each hidden unit's error reaches the expert's output: {'up': (N, p), 'gate': (N, p)}.

    Expert output = Down (silu(g) * u) with g = Gate x, u = Up x. An error e_j in row j of Up moves the
    output by Down[:, j] silu(g_j) e_j x, so row j of Up weighs E[silu(g_j)^2] ||Down[:, j]||^2; a Gate row
    weighs E[(u_j silu'(g_j))^2] ||Down[:, j]||^2 (expectations over the tokens routed to the expert).
    Each expert's weights are scaled to mean 1; experts without tokens get all ones.
    """
    E, p = ck.num_experts, ck.p
    acc = {f: torch.zeros(len(ck.moe_layers) * E, p, dtype=torch.float64) for f in ("up", "gate")}
    cnt = torch.zeros(len(ck.moe_layers) * E)

    def make(L, ex):
        li = ck.moe_layers.index(L)

        def hook(x, top):
            x = x.float()
            for e in range(E):
                sel = (top == e).any(-1)
                if not sel.any():
                    continue
                gu = x[sel] @ ex.gate_up_proj[e].float().T  # (t, 2p), gate rows first
                g, u = gu[:, :p], gu[:, p:]
                sg = torch.sigmoid(g)
                dsilu = sg * (1 + g * (1 - sg))
                i = li * E + e
                acc["up"][i] += (torch.nn.functional.silu(g) ** 2).sum(0).double()
                acc["gate"][i] += ((u * dsilu) ** 2).sum(0).double()
                cnt[i] += int(sel.sum())
        return hook

    _calib_pass(ck, text, n_tokens, context, make)
    down = torch.stack([ck.expert(L, e, "down").float() for L in ck.moe_layers for e in range(E)])  # (N, d, p)
    dn = down.pow(2).sum(1).double()  # (N, p)
    out = {}
    for f, a in acc.items():
        w = a / cnt.clamp_min(1)[:, None] * dn
        w = w / w.mean(1, keepdim=True).clamp_min(1e-30)
        w[cnt == 0] = 1.0
        out[f] = w.float()
    return out


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

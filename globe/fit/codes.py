"""Codes that train when the batch is much smaller than N: row-wise Adam and code passes.

Why: at N = 1440 experts and batch 16 each expert's logits z_i (m,) are in a batch once per epoch of
N / batch = 90 steps. With one dense Adam over the whole (N, m) logits, every step also moves the rows
NOT in the batch: their gradient is zero but their first moment is not, so after each visit a row
keeps moving for ~1 / (1 - beta1 / sqrt(beta2)) ~ 10 more steps (beta = 0.9, 0.99), in the direction
of a gradient computed for a bank that has since changed, about 10 lr-sized sign steps per visit
(benchmarks/bench_codes2.py measures what this does to the support and the error). Two remedies:

- `RowAdam` (`train.codes_optimizer=row_adam`): Adam whose moments, bias correction (a step count per
  row) and parameters change only for the rows in the batch (lazy Adam, as torch.optim.SparseAdam does
  for sparse gradients). With the full batch it is exactly Adam.
- `code_pass` (`train.code_pass_every`, `train.code_pass_steps`): every K steps, every expert's logits
  take `code_pass_steps` RowAdam steps with the bank and gain held fixed, chunk by chunk, A refitted in
  closed form at each step (variable projection, as in the loop). Cost per pass: about 3 x
  code_pass_steps full evaluations (forward, backward to alpha, ridge refit); no bank gradient.

`FitOptimizer` holds Adam for the bank and gain and either the same Adam (codes_optimizer=adam, the
former behaviour) or a RowAdam for the logits, behind one interface for the loop (lr factor, step on
the batch rows, state_dict).
Shapes: logits (N, m); rows (n,) int64 expert indices.
"""

from __future__ import annotations

from typing import Any

import torch

from .model import GlobeParams, sparse_map


class RowAdam(torch.optim.Optimizer):
    """Adam over the rows given to `step(rows)` only (default: all rows); other rows keep their value
    and their moments. Per-row step counts give per-row bias correction. Params: 2-D tensors (N, m)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, rows: torch.Tensor | None = None, closure=None):  # noqa: D102 (Optimizer API)
        for grp in self.param_groups:
            b1, b2 = grp["betas"]
            for p in grp["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                    st["row_step"] = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)
                idx = (torch.arange(p.shape[0], device=p.device) if rows is None
                       else torch.unique(rows.to(p.device)))
                g = p.grad[idx]
                t = st["row_step"][idx] + 1
                st["row_step"][idx] = t
                m = st["exp_avg"][idx].mul_(b1).add_(g, alpha=1 - b1)
                v = st["exp_avg_sq"][idx].mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"][idx], st["exp_avg_sq"][idx] = m, v
                bc1 = (1 - b1 ** t).to(p.dtype)[:, None]
                bc2 = (1 - b2 ** t).to(p.dtype)[:, None]
                p[idx] -= grp["lr"] * (m / bc1) / ((v / bc2).sqrt() + grp["eps"])
        return None


class FitOptimizer:
    """Adam on bank and gain; logits by the same Adam (`adam`) or by RowAdam (`row_adam`)."""

    def __init__(self, prm: GlobeParams, tr: Any):
        self.kind = getattr(tr, "codes_optimizer", "adam")
        self.lr_codes = tr.lr_codes if tr.lr_codes is not None else 5 * tr.lr
        self.lr = tr.lr
        kw = {"betas": tuple(tr.betas), "eps": tr.eps}
        if self.kind == "adam":
            self.opt = torch.optim.Adam([{"params": [prm.bank_raw], "lr": tr.lr},
                                         {"params": [prm.logits], "lr": self.lr_codes},
                                         {"params": [prm.gain], "lr": tr.lr}], weight_decay=tr.weight_decay, **kw)
            self.bases = (tr.lr, self.lr_codes, tr.lr)
            self.copt = None
        else:
            self.opt = torch.optim.Adam([{"params": [prm.bank_raw], "lr": tr.lr},
                                         {"params": [prm.gain], "lr": tr.lr}], weight_decay=tr.weight_decay, **kw)
            self.bases = (tr.lr, tr.lr)
            self.copt = RowAdam([prm.logits], lr=self.lr_codes, **kw)

    def set_lr_factor(self, f: float) -> None:
        for grp, base in zip(self.opt.param_groups, self.bases):
            grp["lr"] = base * f
        if self.copt is not None:
            self.copt.param_groups[0]["lr"] = self.lr_codes * f

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.copt is not None:
            self.copt.zero_grad(set_to_none=True)

    def step(self, rows: torch.Tensor | None = None) -> None:
        """One step; rows (n,): the experts of the batch (only they move under row_adam)."""
        self.opt.step()
        if self.copt is not None:
            self.copt.step(rows)

    def state_dict(self) -> dict:
        out = {"kind": self.kind, "opt": self.opt.state_dict()}
        if self.copt is not None:
            out["copt"] = self.copt.state_dict()
        return out

    def load_state_dict(self, sd: dict) -> None:
        if "kind" not in sd:  # a checkpoint of the former single Adam
            if self.kind == "adam":
                self.opt.load_state_dict(sd)
            return
        if sd["kind"] == self.kind:
            self.opt.load_state_dict(sd["opt"])
            if self.copt is not None:
                self.copt.load_state_dict(sd["copt"])


def code_pass(W: torch.Tensor, s: torch.Tensor, prm: GlobeParams, T: float, opt: FitOptimizer, steps: int, *,
              load, refit, residual, rel_mean, whiten=None, rows=None, lam: float = 1e-4, chunk: int = 32,
              dev="cpu", z_max: float = 1.0, autocast: bool = False, live: torch.Tensor | None = None,
              weights: torch.Tensor | None = None) -> float:
    """`steps` logit updates of every expert with the bank and gain fixed, chunk by chunk; returns the
    mean objective over live experts at the last inner step (before its update).

    load/refit/residual/rel_mean: the loop's own functions, so the objective is the loop's. The logits
    move by RowAdam (opt.copt; for codes_optimizer=adam, a RowAdam made for this pass) at its current lr.
    live (N,) bool: experts that count (dead experts have zero weights and zero gradient anyway).
    weights (N,) on dev: the experts' weights in the objective (the loop's), None = all one.
    """
    copt = opt.copt if opt.copt is not None else RowAdam([prm.logits], lr=opt.lr_codes)
    N = W.shape[0]
    tot, cnt = 0.0, 0
    grad = torch.zeros_like(prm.logits)
    for a in range(0, N, chunk):
        idx = torch.arange(a, min(N, a + chunk))
        Wb, L, Rw = load(W, s, idx, whiten, dev, rows)
        didx = idx.to(dev)
        for k in range(steps):
            z = prm.logits.detach()[didx].requires_grad_()
            alpha = sparse_map(z, T, prm.map_kind, prm.map_alpha)
            M = prm.compose(alpha, autocast, didx, fixed_bank=True)
            with torch.no_grad():
                A = refit(Wb, M.detach(), L, lam)
            r2, n2 = residual(Wb, A, M, L, autocast, Rw)
            obj = rel_mean(r2, n2, None if weights is None else weights[didx])
            (g,) = torch.autograd.grad(obj, z)
            grad[didx] = g
            prm.logits.grad = grad
            copt.step(didx)
            grad[didx] = 0.0
            if k == steps - 1:
                nl = len(idx) if live is None else int(live[idx].sum())
                tot += float(obj.detach()) * nl
                cnt += nl
    prm.logits.grad = None
    prm.constrain_logits(z_max)
    return tot / max(1, cnt)

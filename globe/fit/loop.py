"""Optimisation of one family: Adam on bank, logits and gain; A in closed form (variable projection).

Per step: a minibatch of experts drawn across all layers (a fixed permutation per epoch, derived
from the seed and the epoch, so a resumed run draws the same batches); A refitted by ridge LS for
the batch every `refit_every` steps (else the stored A); loss = mean relative residual
||(W_i/s_i - A_i M_i) L_i||^2 / ||W_i/s_i L_i||^2 (L = whitening or identity) with A detached
(exact gradient of the projected objective when A is at its optimum); the temperature controller
drives the median support of all experts to the target. Every `eval_every` steps the full error is
computed with freshly refitted A (never a stale one) and the best snapshot is kept; patience gives
early stop. At the end: best snapshot restored, codes eps-pruned, A refitted, error cost reported.
Dead experts (see init.live_experts) enter every batch as exact zeros: A = 0, and they are left out
of the objective (mean over live experts only), the temperature controller and the support stats.
Progress: a tqdm bar on a terminal, else one log line every GLOBE_PROGRESS_EVERY_S seconds with
step, loss, support, T, rate and ETA (globe.progress); full evaluations report their own progress.
Banks: `bank.share` (share.py) gives G banks of m atoms; each expert mixes its own layer's bank.
Shapes: W (N, p, d) stored dtype, bank (G, m, r, d), logits (N, m), gain (G,), A (N, p, r).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..artifacts import Family
from ..config import GlobeConfig
from ..errors import GlobeError
from ..maps import code_stats, get_sparse_map, support
from ..progress import Progress, get_logger, log
from .budget import fit_rank
from .codes import FitOptimizer, code_pass
from .dist import Dist
from .init import check_finite, expert_scales, inv_scales, live_experts, mean_one, quiet
from .model import GlobeParams
from .share import expert_banks, layer_banks, warm_start_banks
from .solve import ridge_A
from .temperature import TempController, calibrate, support_schedule

INIT_EVAL_MAX = 512  # experts in the warm start's error estimate (all of them up to this many)
Whiten = Callable[[torch.Tensor], torch.Tensor] | None  # expert idx (n,) -> L (n, d, d)
Rows = Callable[[torch.Tensor], torch.Tensor] | None  # expert idx (n,) -> row weights (n, p)


@dataclass
class FamilyFit:
    artifact: Family
    metrics: dict[str, Any] = field(default_factory=dict)


def batch_indices(step: int, N: int, bs: int, seed: int) -> torch.Tensor:
    """Experts of minibatch `step`: slice of a per-epoch permutation fixed by (seed, epoch)."""
    bs = min(bs, N)
    per = N // bs
    epoch, pos = divmod(step, per)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    return torch.randperm(N, generator=g)[pos * bs:(pos + 1) * bs]


def lr_factor(step: int, steps: int, anneal_frac: float, kind: str) -> float:
    """lr multiplier: constant, or constant while the support anneals then cosine down to 0.05."""
    if kind == "constant":
        return 1.0
    t0 = int(anneal_frac * steps)
    if step < t0 or steps <= t0:
        return 1.0
    x = (step - t0) / max(1, steps - t0)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * x))


def _load(W, s, idx, whiten: Whiten, dev, rows: Rows = None):
    """Normalised experts idx (n, p, d) fp32 on dev (dead experts exactly zero), whitening, row weights."""
    Wb = W[idx].to(dev).float() * inv_scales(s)[idx].to(dev)[:, None, None]
    L = whiten(idx).to(dev) if whiten is not None else None
    R = rows(idx).to(dev).sqrt()[:, :, None] if rows is not None else None  # (n, p, 1)
    return Wb, L, R


def _residual(Wb, A, M, L, autocast: bool, Rw=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted residual^2, weighted norm^2) per expert; R (n, p, 1) weighs rows (hidden units)."""
    if autocast and Wb.device.type in ("cuda", "cpu"):
        with torch.autocast(Wb.device.type, dtype=torch.bfloat16):
            R = Wb - (A @ M).float()
    else:
        R = Wb - A @ M
    if L is not None:
        R, Wn = R @ L, Wb @ L
    else:
        Wn = Wb
    if Rw is not None:  # rows solve independently, so the closed-form A is unchanged by row weights
        R, Wn = R * Rw, Wn * Rw
    return R.pow(2).sum(dim=(1, 2)), Wn.pow(2).sum(dim=(1, 2))


def rel_mean(r2: torch.Tensor, n2: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of w * r2 / n2 over experts with n2 > 0 (dead experts, all zero, have r2 = n2 = 0 and no say);
    w (n,): the experts' weights (train.expert_weights; mean one over all live experts), None = all one."""
    live = n2 > 0
    ratio = r2 / torch.where(live, n2, torch.ones_like(n2))
    return (ratio if w is None else ratio * w).sum() / live.sum().clamp_min(1)


def _refit(Wb, M, L, lam):
    if L is None:
        return ridge_A(Wb, M, lam)
    return ridge_A(Wb @ L, M @ L, lam)


@torch.no_grad()
def evaluate(W, s, prm: GlobeParams, T: float, *, whiten: Whiten = None, rows: Rows = None, lam: float = 1e-4,
             chunk: int = 32,
             dev="cpu", codes: torch.Tensor | None = None, keep_A: bool = False,
             desc: str = "evaluation", progress: bool | None = None,
             on_A: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
             experts: torch.Tensor | None = None, dist: Dist | None = None,
             weights: torch.Tensor | None = None) -> dict[str, Any]:
    """Pass with fresh A: objective, plain relative Frobenius error, optional all A (N, p, r).

    Dead experts are reconstructed as zero (A = 0): the objective is the mean over live experts, and
    the plain error counts each dead expert's whole energy ||W_i||^2 = s_i^2 p d as its residual.
    progress: tqdm (True), log lines (False) or auto (None), labelled `desc`; silent for small families.
    on_A(idx (n,), A (n, p, r)): receives each chunk's adapters (normalised scale) instead of keeping them.
    experts: evaluate only these (ascending) experts (default all); errors are over them.
    dist: a sharded fit (globe.fit.dist): this rank evaluates its own experts, the errors are summed over
    ranks, and A comes back as this rank's rows (a dist.Shard).
    weights (N,): the experts' weights in the objective (rel_mean); the plain error is never weighted.
    """
    N = W.shape[0]
    ids = torch.arange(N) if experts is None else experts.reshape(-1).cpu()
    if dist is not None:  # [dist] this rank's experts only; sums reduced below
        ids = dist.own(ids)
    n = ids.numel()
    dead = ~live_experts(s)[ids]  # dead by the median of ALL experts, also for a sample or a rank's share
    obj = torch.empty(n, dtype=torch.float64)
    res_plain = torch.empty(n, dtype=torch.float64)
    A_all = None
    pg = Progress(n, desc, "experts", bar=progress, quiet=quiet(W.numel() * n // max(N, 1)))
    for a in range(0, n, chunk):
        pos = torch.arange(a, min(n, a + chunk))
        idx = ids[pos]
        Wb, L, Rw = _load(W, s, idx, whiten, dev, rows)
        alpha = prm.codes(idx.to(dev), T) if codes is None else codes[idx].to(dev)
        M = prm.compose(alpha, idx=idx.to(dev))
        A = _refit(Wb, M, L, lam)
        r2, n2 = _residual(Wb, A, M, L, False, Rw)
        obj[pos] = (r2 / torch.where(n2 > 0, n2, torch.ones_like(n2))).double().cpu()
        res_plain[pos] = (Wb - A @ M).pow(2).sum(dim=(1, 2)).double().cpu()
        if on_A is not None:
            on_A(idx, A)
        elif keep_A:
            if A_all is None:
                A_all = torch.empty(n, *A.shape[1:])
            A_all[pos] = A.cpu()
        pg.update(len(idx))
    pg.close()
    p, d = W.shape[1:]
    s = s[ids]
    res_plain[dead] = float(p * d)  # reconstructed as zero: the residual is the whole (normalised) expert
    s2 = s.double().pow(2)
    rel = math.sqrt(float((res_plain * s2).sum() / (s2 * p * d).sum().clamp_min(1e-300)))
    if weights is not None:
        obj = obj * weights[ids].double()
    objective = float(obj[~dead].mean()) if bool((~dead).any()) else 0.0
    if dist is not None and dist.on:  # [dist] errors over every rank's experts; A stays with its rank
        rel, objective = dist.reduce_eval(res_plain * s2, s2 * p * d, obj[~dead])
        A_all = None if A_all is None else dist.shard(A_all)
    return {"objective": objective, "rel_fro_error": rel, "A": A_all}


def _support0(cfg: GlobeConfig, fam: str) -> int:
    sp, m = cfg.sparsity, cfg.bank.m(fam)
    s0 = sp.support0 if sp.support0 is not None else 3 * sp.target_support
    return int(min(m, max(s0, sp.target_support)))


def _layer_bank(cfg: GlobeConfig, N: int, E: int) -> list[int]:
    """Bank of each MoE layer for `bank.share` (N // E layers of E experts)."""
    return layer_banks(cfg.bank.share, max(1, N // max(1, E)))


def _new_state(W, s, cfg: GlobeConfig, fam: str, whiten: Whiten, progress: bool | None = None,
               E: int | None = None, dist: Dist | None = None) -> dict[str, Any]:
    N, p, d = W.shape
    E = E or N
    kw = {"dist": dist} if dist is not None and dist.on else {}  # [dist] one bank only (checked in fit_family)
    ws = warm_start_banks(W, s, _layer_bank(cfg, N, E), E, cfg.bank.m(fam), fit_rank(cfg, fam, N, p, d, N // E),
                          _support0(cfg, fam), kind=cfg.sparsity.map, alpha=cfg.sparsity.alpha, gain=cfg.bank.gain0,
                          method=cfg.bank.init, seed=cfg.bank.seed, T_min=cfg.sparsity.T_min,
                          T_max=cfg.sparsity.T_max, whiten=whiten, progress=progress, name=fam, **kw)
    T = ws.T if cfg.sparsity.T_auto and not get_sparse_map(cfg.sparsity.map).dense else cfg.sparsity.T0
    return {"step": 0, "bank": ws.bank, "logits": ws.logits, "gain": ws.gain, "T": T, "sv": ws.sv,
            "opt": None, "best": None, "bad_evals": 0, "A_all": None, "init_T": T}


def before_step(family: str, step: int) -> None:
    """Called before every optimisation step; does nothing. Tests replace it (monkeypatch) to simulate a
    kill at a given step and check that resuming gives the uninterrupted result."""


def fit_family(W: torch.Tensor, cfg: GlobeConfig, fam: str, *, whiten: Whiten = None, rows: Rows = None,
               weights: torch.Tensor | None = None, dev: str = "cpu",
               ckpt_path: str | os.PathLike | None = None, log: Callable[[dict], None] | None = None,
               progress: bool | None = False,
               on_codes: Callable[[int, torch.Tensor], None] | None = None,
               experts_per_layer: int | None = None, scales: torch.Tensor | None = None,
               sink: Callable[[Family], Any] | None = None, dist: Dist | None = None) -> FamilyFit:
    """Fit one family's GloBE model to experts W (N, p, d); resumable from `ckpt_path`.

    log(record) gets each metrics record; on_codes(step, codes (N, m) cpu) the codes at each evaluation.
    progress: a tqdm bar (True), periodic log lines with step, loss, support, T, rate and ETA (False),
    or auto (None: a bar on a terminal). scales (N,): the experts' RMS if already known (else computed).
    sink(family without A) -> a writer with write_A(idx, A) and close() -> A loader (artifacts.FamilyWriter):
    the final adapters are streamed to it chunk by chunk instead of held as one (N, p, r) tensor.
    dist (globe.fit.dist.Dist): a sharded fit; W is then a dist.Shard holding this rank's experts,
    `scales` (all N) and `sink` are required, and every rank must call fit_family.
    weights (N,): each expert's weight in the objective (train.expert_weights=routing; calib.routing_weights),
    rescaled here to mean one over the live experts; None weighs every expert alike.
    Raises GlobeError when an expert holds NaN/inf, every expert is zero, or weights are not N positive
    finite numbers.
    """
    t0 = time.time()
    dist = dist or Dist()  # [dist] single process: every dist call below is a no-op
    if dist.on and (scales is None or sink is None):
        raise GlobeError("fit_family: a sharded fit needs the scales of all experts and a sink")
    if dist.on and (len(set(_layer_bank(cfg, W.shape[0], experts_per_layer or W.shape[0]))) > 1
                    or cfg.train.code_pass_every):
        raise GlobeError(f"a sharded fit supports one bank per family (bank.share=global, got {cfg.bank.share!r}) "
                         f"and no code passes (train.code_pass_every=0, got {cfg.train.code_pass_every}) for now")
    if dist.on and cfg.sparsity.recalibrate:
        raise GlobeError("a sharded fit does not support sparsity.recalibrate yet (each rank holds its own "
                         "experts' logits); set sparsity.recalibrate=0")
    tr, sp = cfg.train, cfg.sparsity
    dense = get_sparse_map(sp.map).dense
    N, p, d = W.shape
    s = expert_scales(W) if scales is None else scales.float()
    check_finite(s, f"family {fam}: expert")
    live = live_experts(s)
    if not bool(live.any()):
        raise GlobeError(f"family {fam}: every routed expert is zero; nothing to fit")
    if weights is not None:
        weights = mean_one(weights, live, f"family {fam}")
    state = dist.load_state(ckpt_path) if ckpt_path else None  # [dist] + this rank's A
    resumed = state is not None
    if resumed and dist.rank == 0:  # (the module's logger: `log` here is the caller's metrics sink)
        get_logger().info("fit %s: resuming from its checkpoint at step %d of %d", fam, state["step"], tr.steps)
    if state is None:
        state = _new_state(W, s, cfg, fam, whiten, progress, experts_per_layer, dist)
    layer_bank = _layer_bank(cfg, N, experts_per_layer or N)
    prm = GlobeParams(state["bank"], state["logits"], state["gain"], cfg.bank.activation, sp.map, sp.alpha,
                      bank_of=expert_banks(layer_bank, experts_per_layer or N)).to(dev)
    opt = FitOptimizer(prm, tr)  # Adam on bank and gain; logits by Adam or row-wise Adam (codes.py)
    if state["opt"] is not None:
        opt.load_state_dict(state["opt"])
    ctrl = TempController(state["T"], sp.target_support, sp.eta, sp.T_min, sp.T_max)
    K, lam, chunk = tr.refit_every, tr.ridge, tr.eval_chunk
    A_all = state["A_all"]
    live_d = live.to(dev)
    evkw = {"whiten": whiten, "rows": rows, "lam": lam, "chunk": chunk, "dev": dev, "progress": progress,
            "dist": dist, "weights": weights}
    w_dev = None if weights is None else weights.to(dev)
    if K > 1 and A_all is None:
        A_all = evaluate(W, s, prm, ctrl.T, keep_A=True, desc=f"initial A {fam}", **evkw)["A"]
    best, bad = state["best"], state["bad_evals"]
    if best is None:  # the warm start's error: on every expert, or an evenly spaced sample of a large family
        sample = None if N <= INIT_EVAL_MAX else torch.linspace(0, N - 1, INIT_EVAL_MAX).round().long().unique()
        ev = evaluate(W, s, prm, ctrl.T, desc=f"initial evaluation {fam}", experts=sample, **evkw)
        best = {"obj": math.inf, "err": math.inf, "step": -1, "T": ctrl.T, "params": None}
        state["init_err"], state["init_eval_experts"] = ev["rel_fro_error"], N if sample is None else len(sample)
    init_err = state.get("init_err", float("nan"))
    bar = Progress(tr.steps, f"fit {fam}", "steps", bar=progress, initial=state["step"])
    step, last = state["step"], None
    stopped_early = False
    last_ev = None  # (step, objective, error) of the latest full evaluation
    while step < tr.steps:
        before_step(fam, step)
        ts = time.time()
        f = lr_factor(step, tr.steps, sp.anneal_frac, tr.lr_schedule)
        opt.set_lr_factor(f)
        idx_all = batch_indices(step, N, tr.batch_size, tr.seed)
        idx = dist.own(idx_all)  # [dist] this rank's experts of the global batch (all of them in one process)
        Wb, L, Rw = _load(W, s, idx, whiten, dev, rows)
        didx = idx.to(dev)
        alpha = prm.codes(didx, ctrl.T)
        M = prm.compose(alpha, tr.autocast_bf16, didx)
        with torch.no_grad():
            if K == 1 or step % K == 0:
                A = _refit(Wb, M.detach(), L, lam)
                if A_all is not None:
                    A_all[idx] = A.cpu()
            else:
                A = A_all[idx].to(dev)
        r2, n2 = _residual(Wb, A, M, L, tr.autocast_bf16, Rw)
        wb = None if w_dev is None else w_dev[didx]
        obj = rel_mean(r2, n2, wb)
        loss = obj + (sp.l1 * prm.logits[didx].abs().mean() if sp.l1 > 0 else 0.0)
        loss_all, r2_all, n2_all = loss.detach(), r2.detach().sum(), n2.detach().sum()
        if dist.on:  # [dist] this rank's share (gradients sum to the global one) and the global values
            loss, loss_all, r2_all, n2_all = dist.batch_loss(r2, n2, prm.logits[didx], sp.l1, len(idx_all), wb)
        if not torch.isfinite(loss_all):
            where = f"; last good checkpoint (step {state['step']}) kept in {ckpt_path}" if ckpt_path else ""
            raise GlobeError(f"fit of family {fam}: loss became NaN/inf at step {step}; stopped{where}")
        opt.zero_grad()
        loss.backward()
        dist.reduce_grads(prm)  # [dist] sum over ranks (bank, gain; logits rows are disjoint)
        opt.step(idx_all.to(dev))  # row_adam moves the rows of the whole batch (summed over ranks)
        prm.constrain_logits(sp.z_max)
        if tr.code_pass_every and (step + 1) % tr.code_pass_every == 0:  # every expert's codes, bank fixed
            code_pass(W, s, prm, ctrl.T, opt, tr.code_pass_steps, load=_load, refit=_refit, residual=_residual,
                      rel_mean=rel_mean, whiten=whiten, rows=rows, lam=lam, chunk=chunk, dev=dev, z_max=sp.z_max,
                      autocast=tr.autocast_bf16, live=live, weights=w_dev)
        with torch.no_grad():
            codes_now = prm.codes(None, ctrl.T)  # (N, m) at the T this step used
            sup = support(codes_now[live_d]).float()
            med, p95 = float(sup.median()), float(torch.quantile(sup, 0.95))
        T_used = ctrl.T
        tgt = support_schedule(step + 1, tr.steps, sp.target_support, _support0(cfg, fam), sp.anneal_frac)
        if not dense:  # a dense map (softmax) has full support at any T: nothing to control
            x = float(sp.recalibrate)
            if x > 1 and not tgt / x <= med <= tgt * x:  # far off: jump, then keep controlling
                with torch.no_grad():
                    z = prm.logits.detach()[live_d] if bool(live_d.any()) else prm.logits.detach()
                    ctrl.T = calibrate(z, max(1, round(tgt)), sp.map, sp.alpha, ctrl.T_min, ctrl.T_max)
            else:
                ctrl.update(med, tgt)
        step += 1
        batch_err = math.sqrt(float(r2_all / n2_all.clamp_min(1e-30)))
        last = {"step": step, "family": fam, "loss": float(loss_all), "rel_error": batch_err,
                "support_median": med, "support_p95": p95, "temperature": T_used,
                "gain": float(prm.gain.detach().mean()), "step_time": time.time() - ts}
        if step % tr.eval_every == 0 or step == tr.steps:
            ev = evaluate(W, s, prm, ctrl.T, desc=f"evaluation {fam} at step {step}", **evkw)
            last.update(eval_objective=ev["objective"], eval_rel_fro_error=ev["rel_fro_error"])
            last_ev = (step, ev["objective"], ev["rel_fro_error"])
            on_target = dense or (abs(med - sp.target_support) <= 1 and tgt == sp.target_support)
            if on_target and (ev["objective"] < best["obj"] * (1 - 1e-4)):
                best = {"obj": ev["objective"], "err": ev["rel_fro_error"], "step": step, "T": ctrl.T,
                        "params": copy.deepcopy(prm.state_dict())}
                bad = 0
            elif on_target:
                bad += 1
            if tr.patience and bad >= tr.patience:
                stopped_early = True
        if log and (step % tr.log_every == 0 or "eval_objective" in last or step == tr.steps):
            log(last)
        if on_codes is not None and "eval_objective" in last:
            on_codes(step, codes_now.detach().cpu())
        bar.set_postfix(loss=f"{last['loss']:.4g}", err=f"{batch_err:.4f}", sup=f"{med:.0f}", T=f"{T_used:.3g}")
        bar.update(1)
        if ckpt_path and (step % tr.checkpoint_every == 0 or step == tr.steps or stopped_early):
            state.update(step=step, bank=prm.bank_raw.detach().cpu(), logits=prm.logits.detach().cpu(),
                         gain=prm.gain.detach().cpu(), T=ctrl.T, opt=opt.state_dict(), best=best, bad_evals=bad,
                         A_all=A_all, done=False)
            dist.save_state(state, ckpt_path)  # [dist] rank 0 + per-layer A
        if stopped_early:
            break
    bar.close()
    if best["params"] is None:  # never on target at an evaluation: keep the final state
        best = {"step": step, "T": ctrl.T, "params": copy.deepcopy(prm.state_dict())}
        if last_ev is not None and last_ev[0] == step:  # evaluated at this very state: no second pass
            best.update(obj=last_ev[1], err=last_ev[2])
    return _finish(W, s, prm, best, cfg, fam, whiten=whiten, rows=rows, dev=dev, state=state, init_err=init_err,
                   step=step, early=stopped_early, resumed=resumed, t0=t0, E=experts_per_layer or N,
                   progress=progress, sink=sink, dist=dist)


def _finish(W, s, prm, best, cfg, fam, *, whiten, rows, dev, state, init_err, step, early, resumed, t0,
            E, progress=None, sink=None, dist=None) -> FamilyFit:
    """Restore the best snapshot, epsilon-prune the codes, refit A once more (streamed to `sink` if
    given), and gather the metrics. The best snapshot's error was measured when it was taken, so the
    error before pruning needs no extra pass (a full evaluation costs ~17 min at Qwen1.5-MoE's size)."""
    tr, sp = cfg.train, cfg.sparsity
    N, p, d = W.shape
    prm.load_state_dict(best["params"])
    T = best["T"]
    evkw = {"whiten": whiten, "rows": rows, "lam": tr.ridge, "chunk": tr.eval_chunk, "dev": dev, "progress": progress,
            "dist": dist}
    with torch.no_grad():
        alpha = prm.codes(None, T)
        pre_err = best.get("err", math.nan)
        if not math.isfinite(pre_err):  # the final state was never evaluated on target
            pre_err = evaluate(W, s, prm, T, desc=f"final evaluation {fam}", **evkw)["rel_fro_error"]
        mx = alpha.max(-1, keepdim=True).values
        live = live_experts(s).to(alpha.device)
        pruned = _dead_codes(torch.where(alpha >= sp.eps_prune * mx, alpha, torch.zeros_like(alpha)), live)
        art = Family.from_fit(_unit(prm.bank_raw.detach().cpu()), pruned.cpu(), None, prm.gain.detach().cpu(), E,
                              layer_bank=_layer_bank(cfg, N, E), activation=cfg.bank.activation, p=p,
                              meta={"map": sp.map, "alpha": sp.alpha, "temperature": T, "eps_prune": sp.eps_prune,
                                    "target_support": sp.target_support, "share": cfg.bank.share})
        if sink is not None:  # A goes to disk chunk by chunk, scale folded in
            writer = sink(art)
            try:
                post = evaluate(W, s, prm, T, codes=pruned, desc=f"prune and refit A {fam}",
                                on_A=lambda idx, A: writer.write_A(idx, A * s[idx.cpu()].to(A)[:, None, None]),
                                **evkw)
            except BaseException:
                writer.abort()
                raise
            art.load_A = writer.close()
        else:
            post = evaluate(W, s, prm, T, codes=pruned, keep_A=True, desc=f"prune and refit A {fam}", **evkw)
            art.A_layers = list(post["A"].mul_(s[:, None, None]).split(E))  # scale folded in place
    sup = support(pruned[live]).float()
    target = cfg.sparsity.target_support
    if not get_sparse_map(cfg.sparsity.map).dense and abs(float(sup.median()) - target) > max(1.0, 0.25 * target):
        log("fit %s: median support %.0f, far from sparsity.target_support=%d: temperature control had too few "
            "steps (%d) to settle; raise train.steps (a few hundred on small models) or set sparsity.recalibrate=2",
            fam, float(sup.median()), target, step)
    sv = state["sv"]
    G, m, r = prm.bank_raw.shape[:3]
    floor = math.sqrt(float((sv[:, r:].pow(2).sum(1) * s.pow(2)).sum() / (sv.pow(2).sum(1) * s.pow(2)).sum()))
    metrics = {
        "rel_fro_error": post["rel_fro_error"], "rel_fro_error_before_prune": pre_err,
        "prune_error_cost": post["rel_fro_error"] - pre_err, "objective": post["objective"],
        "init_rel_fro_error": init_err, "init_eval_experts": state.get("init_eval_experts", N),
        "svd_floor_rank_r": floor, "median_support": float(sup.median()),
        "p95_support": float(torch.quantile(sup, 0.95)), "min_support": int(sup.min()),
        "max_support": int(sup.max()), "temperature": T, "gain": float(prm.gain.detach().mean()),
        "best_step": best["step"],
        "steps_run": step, "stopped_early": early, "resumed": resumed, "m": m, "r": r,
        "share": cfg.bank.share, "banks": G, "m_total": G * m, "gains": prm.gain.detach().cpu().tolist(),
        "stored_params": art.stored_params(), "original_params": N * p * d, "fit_time_s": time.time() - t0,
        "atom_popularity": code_stats(pruned)["atom_popularity"],
        "support_hist": code_stats(pruned[live])["support_counts"],
        "dead_experts": int((~live_experts(s)).sum()),
    }
    return FamilyFit(artifact=art, metrics=metrics)


def _dead_codes(codes: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Codes (N, m) with each dead expert's row set to one atom (nnz 1): A_i = 0 makes it exact zero."""
    out = codes.clone()
    dead = (~live).nonzero().flatten()
    if len(dead):
        j = codes[dead].argmax(-1)
        out[dead] = 0.0
        out[dead, j] = 1.0
    return out


def _unit(raw: torch.Tensor) -> torch.Tensor:
    from .model import unit_atoms
    return unit_atoms(raw)


def _save(state: dict, path) -> None:
    from ..artifacts import atomic_write
    atomic_write(path, lambda tmp: torch.save(state, tmp))

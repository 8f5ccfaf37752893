"""Codes at small batch (globe/fit/codes.py): row-wise Adam, code passes with the bank fixed."""

from __future__ import annotations

import pytest
import torch

from globe.config import GlobeConfig
from globe.fit import loop
from globe.fit.codes import FitOptimizer, RowAdam, code_pass
from globe.fit.loop import _load, _refit, _residual, evaluate, fit_family, rel_mean
from globe.fit.model import GlobeParams


def test_row_adam_is_adam_on_full_rows_and_leaves_other_rows_alone():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, generator=g)
    grads = [torch.randn(6, 4, generator=g) for _ in range(5)]
    a, b = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
    oa, ob = torch.optim.Adam([a], lr=0.1, betas=(0.9, 0.99), eps=1e-8), RowAdam([b], lr=0.1, betas=(0.9, 0.99))
    for gr in grads:
        a.grad, b.grad = gr.clone(), gr.clone()
        oa.step()
        ob.step()
    assert torch.allclose(a, b, atol=1e-6)
    # rows outside the batch neither move nor age: a row's first step is a plain Adam first step (size lr)
    c = torch.nn.Parameter(x0.clone())
    oc = RowAdam([c], lr=0.1)
    for _ in range(3):
        c.grad = torch.ones(6, 4)
        oc.step(torch.tensor([0, 1]))
    assert torch.equal(c[2:], x0[2:])
    c.grad = -torch.ones(6, 4)
    oc.step(torch.tensor([4]))
    assert torch.allclose(c[4], x0[4] + 0.1, atol=1e-6) and torch.equal(c[5], x0[5])
    sd = oc.state_dict()  # resumable: the per-row step counts are part of the state
    od = RowAdam([torch.nn.Parameter(c.detach().clone())], lr=0.1)
    od.load_state_dict(sd)
    assert torch.equal(od.state_dict()["state"][0]["row_step"], torch.tensor([3.0, 3, 0, 0, 1, 0], dtype=torch.float64))


def test_code_pass_lowers_the_objective_with_the_bank_fixed():
    g = torch.Generator().manual_seed(1)
    N, m, r, p, d = 24, 6, 4, 8, 12
    W = torch.randn(N, p, d, generator=g)
    s = torch.ones(N)
    prm = GlobeParams(torch.randn(m, r, d, generator=g), torch.randn(N, m, generator=g) * 0.3, 1.0)
    tr = GlobeConfig.from_dict({"train": {"codes_optimizer": "row_adam", "lr": 0.01}}).train
    opt = FitOptimizer(prm, tr)
    T = 1.0
    before = evaluate(W, s, prm, T)["objective"]
    bank = prm.bank_raw.detach().clone()
    for _ in range(3):
        code_pass(W, s, prm, T, opt, 5, load=_load, refit=_refit, residual=_residual, rel_mean=rel_mean, chunk=8,
                  z_max=0.0)
    after = evaluate(W, s, prm, T)["objective"]
    assert torch.equal(prm.bank_raw.detach(), bank)  # the bank is untouched
    assert after < before * 0.99, (before, after)


@pytest.mark.parametrize("kind", ["adam", "row_adam"])
def test_small_batch_fit_with_code_passes_runs_and_resumes(tmp_path, kind, monkeypatch):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(40, 8, 12, generator=g)
    cfg = GlobeConfig.from_dict({"bank": {"m_up": 4, "r": 4}, "sparsity": {"target_support": 2},
                                 "train": {"steps": 12, "batch_size": 4, "eval_every": 6, "checkpoint_every": 3,
                                           "codes_optimizer": kind, "code_pass_every": 5, "code_pass_steps": 2}})
    ref = fit_family(W, cfg, "up")
    ck = tmp_path / "c.pt"
    def kill(fam, step):  # a kill at step 7 (loop.before_step is the hook tests replace)
        if step == 7:
            raise KeyboardInterrupt(f"killed at step {step}")

    with monkeypatch.context() as mp:
        mp.setattr(loop, "before_step", kill)
        with pytest.raises(KeyboardInterrupt):
            fit_family(W, cfg, "up", ckpt_path=ck)
    res = fit_family(W, cfg, "up", ckpt_path=ck)
    assert res.metrics["resumed"]
    assert res.metrics["rel_fro_error"] == pytest.approx(ref.metrics["rel_fro_error"], rel=1e-5)

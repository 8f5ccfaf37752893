"""Budget-first settings (bank.budget): r derived for any (N, p, d), explicit r wins, infeasible budgets
name the nearest feasible one, and the default fit compresses every registry architecture to the budget."""

from __future__ import annotations

import json

import pytest
import torch

from globe.config import BankCfg, GlobeConfig
from globe.fit.budget import globe_params, plan_rank

SHAPES = [  # (N, p, d): Qwen1.5-MoE, p > d (held-out Qwen2-MoE), Mixtral-like p >> d, tiny, fixture 2
    (1440, 1408, 2048), (144, 256, 128), (256, 14336, 4096), (12, 24, 32), (1440, 40, 56)]


@pytest.mark.parametrize("N,p,d", SHAPES)
@pytest.mark.parametrize("budget", [0.3, 0.4, 0.5])
@pytest.mark.parametrize("banks", [1, 4])
def test_derived_rank_is_the_largest_aligned_rank_within_budget(N, p, d, budget, banks):
    m, s = 8, 4
    full = N * p * d
    try:
        plan = plan_rank(N, p, d, m, s, banks=banks, budget=budget)
    except ValueError as e:  # only when even r = 1 is over budget, or r = min(p, d) is under it
        assert str(e).startswith("bank.budget: ")
        lo = globe_params(N, p, d, m, 1, N * s, banks) / full
        hi = globe_params(N, p, d, m, min(p, d), N * s, banks) / full
        assert lo > budget or hi < budget
        return
    r = plan.r
    assert plan.source == "budget" and plan.budget == budget
    assert 1 <= r <= min(p, d)
    stored = globe_params(N, p, d, m, r, N * s, banks)
    assert stored <= budget * full and plan.predicted == pytest.approx(stored / full)
    step = 8 if r >= 8 else 1
    assert r % step == 0  # bf16 rows of A_i (p, r) are 2 r bytes: a multiple of 16 for torch grouped_mm
    assert globe_params(N, p, d, m, r + step, N * s, banks) > budget * full or r + step > min(p, d)


def test_explicit_rank_wins_and_old_default_blind_to_d_is_gone():
    assert plan_rank(100, 64, 32, 8, 4, r=5, budget=0.3).r == 5
    assert plan_rank(100, 64, 32, 8, 4, r_frac=0.25, budget=0.3).r == 16
    # Mixtral-shaped experts: the former default r = p / 2 = 7168 exceeded min(p, d) = 4096; the budget does not
    plan = plan_rank(8 * 32, 14336, 4096, 32, 8, budget=0.4)
    assert plan.r <= 4096 and plan.r % 8 == 0 and 0.39 < plan.predicted <= 0.4
    cfg = GlobeConfig.from_dict({})
    assert cfg.bank.budget == 0.4 and cfg.bank.r is None and cfg.bank.r_frac is None
    cfg.check_shapes(14336, 4096, 8 * 32, 32)  # the defaults are valid for Mixtral-8x7B's shapes


@pytest.mark.parametrize("budget,shape", [(0.001, (12, 24, 32)), (0.01, (1440, 40, 56)), (1.0, (1440, 40, 56))])
def test_infeasible_budget_names_the_nearest_feasible_one(budget, shape):
    with pytest.raises(ValueError, match=r"^bank\.budget: .*nearest feasible budget is ([0-9.]+)") as ei:
        plan_rank(*shape, 8, 2, budget=budget)
    near = float(str(ei.value).split("nearest feasible budget is ")[1].split()[0])
    plan = plan_rank(*shape, 8, 2, budget=near)  # the suggestion itself is feasible, and near
    assert plan.predicted <= near and abs(near - budget) < abs(budget - (0.5 if budget < 0.5 else 0.2))


def test_budget_validated_in_post_init():
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"^bank\.budget: "):
            BankCfg(budget=bad)
    with pytest.raises(ValueError, match=r"^bank\.budget: "):
        BankCfg(budget=None)  # nothing to derive r from
    with pytest.raises(ValueError, match=r"^bank\.r_multiple: "):
        BankCfg(r_multiple=0)
    assert BankCfg(budget=None, r=4).rank(10) == 4


def test_cli_refuses_an_infeasible_budget_in_one_line(tmp_path, capsys):
    from globe.cli.main import main
    from globe.fixtures import fixture_path

    rc = main(["fit", f"model.path={fixture_path()}", f"output_dir={tmp_path / 'o'}", "bank.budget=0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: bank.budget: 0.01 cannot be met"), err
    assert "nearest feasible budget is" in err[0] and not (tmp_path / "o").exists()


VARIANTS = {  # registry architectures at three expert shapes each: p < d (as built), p > d, p >> d
    "p<d": {}, "p>d": {"hidden_size": 16}, "p>>d": {"hidden_size": 8},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_defaults_compress_every_registry_architecture_to_the_budget(tmp_path, variant):
    """`globe fit` with default bank settings on every registry architecture: the achieved stored fraction
    is at most the budget asked, the next aligned rank would exceed it, summary.json says both."""
    from globe.fit.run import run_fit
    from globe.io.checkpoint import Checkpoint
    from globe.testing.models import TINY, save_model, tiny_model

    for mt in TINY:
        kw = dict(VARIANTS[variant])
        if kw and mt.startswith("deepseek"):
            kw.update(num_attention_heads=2, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4)
        src = save_model(tiny_model(mt, **kw), tmp_path / f"{mt}_{variant}")
        ck = Checkpoint(src)
        N, p, d = len(ck.moe_layers) * ck.num_experts, ck.p, ck.hidden_size
        out = tmp_path / f"o_{mt}_{variant}"
        cfg = GlobeConfig.from_dict({"model": {"path": str(src)}, "output_dir": str(out),
                                     "train": {"steps": 2, "eval_every": 1, "device": "cpu", "baselines": False}})
        summ = run_fit(cfg, progress=False)
        b = summ["budget"]
        assert b["asked"] == 0.4 and b["rank_source"] == ["budget"], (mt, b)
        assert b["achieved"] <= 0.4, (mt, variant, N, p, d, b)
        for f, fs in summ["families"].items():
            r, m = fs["r"], fs["m"]
            step = 8 if r >= 8 else 1
            nxt = globe_params(N, p, d, m, r + step, N * cfg.sparsity.target_support) / (N * p * d)
            assert nxt > 0.4 or r + step > min(p, d), (mt, variant, f, r)
            assert fs["stored_fraction"] <= 0.4 and fs["budget_asked"] == 0.4
        assert json.loads((out / "summary.json").read_text())["budget"] == b
        torch.testing.assert_close(torch.tensor(b["achieved"]),
                                   torch.tensor(b["stored_params"] / b["original_params"]))

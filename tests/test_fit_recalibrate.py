"""sparsity.recalibrate: a short fit whose support would collapse (to 1 on the fixture at 40 steps, see
benchmarks/results/recalibrate_fixture.json) ends on its target support when T may jump by bisection."""

from __future__ import annotations

import pytest

import globe
from globe import BankCfg, FitCfg, SparsityCfg, TrainCfg
from globe.fixtures import FIXTURE_DIR


def test_short_fit_reaches_its_support(tmp_path):
    cfg = FitCfg(bank=BankCfg(m_up=16, m_gate=16, r_frac=0.5),
                 sparsity=SparsityCfg(target_support=8, recalibrate=2.0),
                 train=TrainCfg(steps=40, batch_size=16, eval_every=20, families=["up"], baselines=False))
    summary = globe.compress(FIXTURE_DIR, tmp_path / "fit", cfg)
    assert abs(summary["families"]["up"]["median_support"] - 8) <= 1


@pytest.mark.parametrize("x", [0.5, 1.0, -2])
def test_recalibrate_factor_checked(x):
    with pytest.raises(ValueError, match="sparsity.recalibrate"):
        SparsityCfg(recalibrate=x)

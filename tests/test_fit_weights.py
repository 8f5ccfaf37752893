"""Expert weights in the fit's objective (`train.expert_weights=routing`, globe/fit/calib.py routing_weights).

What a wrong implementation would violate:
- the weights from counts are the closed form (max(n, 1) / mean max(n, 1)) ^ power, worked out by hand;
- equal weights are bitwise the unweighted fit (the weights are rescaled to mean one: nothing else moves);
- experts given a large weight end with a lower error than in the unweighted fit (the bank leans to them);
- bad weights, an unknown kind, a power out of range or routing without a calibration text are refused;
- `globe fit` with routing weights records the counts it used (their sum is tokens x top-k x layers);
- a sharded fit with weights matches the one-process weighted fit (tests/test_fit_distributed.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import one_line

from globe.cli.main import main
from globe.config import GlobeConfig
from globe.errors import GlobeError
from globe.fit.calib import routing_weights
from globe.fit.loop import fit_family
from globe.io.checkpoint import Checkpoint
from globe.testing.models import FIXTURE_DIR


def test_routing_weights_closed_form():
    n = torch.tensor([0.0, 1.0, 3.0, 4.0])  # clamped to [1, 1, 3, 4], mean 9 / 4
    want = torch.tensor([4 / 9, 4 / 9, 12 / 9, 16 / 9])
    assert torch.allclose(routing_weights(n, 1.0), want, rtol=1e-6)
    assert torch.allclose(routing_weights(n, 0.5), want.sqrt(), rtol=1e-6)
    assert torch.equal(routing_weights(n, 0.0), torch.ones(4))


@pytest.fixture(scope="module")
def W():
    return Checkpoint(FIXTURE_DIR).load_family("up", torch.float32)  # (64, 88, 128)


def cfg(**train):
    return GlobeConfig.from_dict({"bank": {"m_up": 8, "r": 24}, "sparsity": {"target_support": 4},
                                  "train": {"steps": 30, "batch_size": 64, "lr": 0.03, "eval_every": 10,
                                            "code_pass_every": 10, "seed": 0, **train}})


def per_expert_error(W, fit) -> torch.Tensor:
    Wh = fit.artifact.reconstruct()
    return ((W - Wh).pow(2).sum((1, 2)) / W.pow(2).sum((1, 2))).sqrt()


def test_equal_weights_are_the_unweighted_fit_bitwise(W):
    a = fit_family(W, cfg(), "up")
    b = fit_family(W, cfg(), "up", weights=torch.full((W.shape[0],), 3.0))
    assert torch.equal(a.artifact.bank, b.artifact.bank) and torch.equal(a.artifact.codes, b.artifact.codes)
    assert a.metrics["rel_fro_error"] == b.metrics["rel_fro_error"]


def test_heavy_experts_are_fitted_better(W):
    heavy = torch.zeros(W.shape[0], dtype=torch.bool)
    heavy[::8] = True  # 8 of 64 experts, spread over the 4 layers
    w = torch.where(heavy, 20.0, 1.0)
    e0 = per_expert_error(W, fit_family(W, cfg(), "up"))
    e1 = per_expert_error(W, fit_family(W, cfg(), "up", weights=w))
    assert e1[heavy].mean() < 0.97 * e0[heavy].mean(), (e1[heavy].mean(), e0[heavy].mean())
    assert e1[~heavy].mean() > e0[~heavy].mean()  # paid for by the others: the weights trade, they do not add


@pytest.mark.parametrize("w", [torch.ones(63), torch.zeros(64), torch.full((64,), float("nan")),
                               torch.tensor([-1.0] + [1.0] * 63), torch.ones(64, 1), torch.ones(8, 8)])
def test_bad_weights_are_refused(W, w):
    with pytest.raises(GlobeError, match=r"expert weights must be 64 positive finite numbers, shape \(64,\)"):
        fit_family(W, cfg(steps=1), "up", weights=w)


def test_huge_weights_do_not_overflow_to_zero(W):
    """3e38 each: their fp32 mean overflows; rescaled by the largest first, they are all one."""
    a = fit_family(W, cfg(steps=4), "up")
    b = fit_family(W, cfg(steps=4), "up", weights=torch.full((W.shape[0],), 3e38))
    assert torch.equal(a.artifact.bank, b.artifact.bank)


@pytest.mark.parametrize("train, key", [({"expert_weights": "routing"}, "train.calib_text"),
                                        ({"expert_weights": "tokens"}, "train.expert_weights"),
                                        ({"expert_weight_power": -0.5}, "train.expert_weight_power"),
                                        ({"expert_weight_power": 3}, "train.expert_weight_power"),
                                        ({"expert_weight_power": "nan"}, "train.expert_weight_power")])
def test_bad_settings_are_refused(train, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        GlobeConfig.from_dict({"train": train})


def test_cli_refuses_routing_without_text_and_a_missing_text(capsys, tmp_path):
    out = tmp_path / "o"
    msg = one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={out}", "train.expert_weights=routing"])
    assert "train.calib_text" in msg and not out.exists()
    msg = one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={out}", "train.expert_weights=routing",
                            f"train.calib_text={tmp_path / 'none.txt'}"])
    assert "train.calib_text: file not found" in msg and not out.exists()


def test_fit_with_routing_weights_records_its_counts(tmp_path):
    out = tmp_path / "fit"
    tokens = 300
    assert main(["fit", f"model.path={FIXTURE_DIR}", f"output_dir={out}", "train.expert_weights=routing",
                 f"train.calib_text={FIXTURE_DIR / 'eval.txt'}", f"train.calib_tokens={tokens}", "train.steps=4",
                 "train.eval_every=2", "bank.m_up=8", "bank.m_gate=8", "bank.r=24", "sparsity.target_support=4",
                 "train.device=cpu"]) == 0
    s = json.loads((out / "summary.json").read_text())
    ew = s["expert_weights"]
    ck = Checkpoint(FIXTURE_DIR)
    assert ew["kind"] == "routing" and ew["power"] == 0.5 and ew["calib_tokens"] == tokens
    assert ew["routed_tokens"] == tokens * ck.top_k * len(ck.moe_layers)
    assert ew["count_min"] <= ew["count_median"] <= ew["count_max"]
    assert 0 < ew["weight_min"] <= 1 <= ew["weight_max"]
    assert s["objective"] == "weight"
    # a rerun of the finished fit reads no calibration text (the pass costs a forward at full size) and
    # keeps the counts it recorded
    import globe.fit.calib as calib

    def boom(*a, **k):
        raise AssertionError("calibration pass on a finished fit")
    mp = pytest.MonkeyPatch()
    mp.setattr(calib, "calibration_stats", boom)
    try:
        assert main(["fit", f"model.path={FIXTURE_DIR}", f"output_dir={out}", "train.expert_weights=routing",
                     f"train.calib_text={FIXTURE_DIR / 'eval.txt'}", f"train.calib_tokens={tokens}",
                     "train.steps=4", "train.eval_every=2", "bank.m_up=8", "bank.m_gate=8", "bank.r=24",
                     "sparsity.target_support=4", "train.device=cpu"]) == 0
    finally:
        mp.undo()
    assert json.loads((out / "summary.json").read_text())["expert_weights"] == ew


def test_a_changed_calibration_text_or_power_is_another_fit(tmp_path, capsys):
    """The fit's identity holds the text's content, not only its path; the refusal names what differs."""
    text = tmp_path / "calib.txt"
    text.write_text((FIXTURE_DIR / "eval.txt").read_text()[:4000])
    out = tmp_path / "fit"
    args = ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={out}", "train.expert_weights=routing",
            f"train.calib_text={text}", "train.calib_tokens=200", "train.steps=2", "train.eval_every=1",
            "bank.m_up=8", "bank.m_gate=8", "bank.r=24", "sparsity.target_support=4", "train.device=cpu",
            "train.families=[up]"]
    assert main(args) == 0
    before = (out / "summary.json").read_text()
    text.write_text((FIXTURE_DIR / "eval.txt").read_text()[-4000:])  # same path, other words
    msg = one_line(capsys, args)
    assert "holds a different fit" in msg and "calib_text_sha256" in msg
    assert (out / "summary.json").read_text() == before  # the finished fit is left as it was
    msg = one_line(capsys, [*args, "train.expert_weight_power=1"])
    assert "train.expert_weight_power" in msg


def test_mobe_baseline_takes_the_same_weights(W):
    """The MoBE-style baseline: equal weights are bitwise its unweighted fit; heavy experts fit better."""
    from globe.fit.baselines import mobe_fit
    kw = {"steps": 40, "lr": 0.03, "seed": 0, "return_weights": True}
    a = mobe_fit(W, 4, 4, 24, **kw)
    b = mobe_fit(W, 4, 4, 24, weights=torch.full((W.shape[0],), 0.5), **kw)
    assert torch.equal(a["W_hat"], b["W_hat"])
    heavy = torch.zeros(W.shape[0], dtype=torch.bool)
    heavy[::8] = True
    c = mobe_fit(W, 4, 4, 24, weights=torch.where(heavy, 20.0, 1.0), **kw)

    def err(x):
        return ((W - x["W_hat"]).pow(2).sum((1, 2)) / W.pow(2).sum((1, 2))).sqrt()
    assert err(c)[heavy].mean() < 0.97 * err(a)[heavy].mean()
    with pytest.raises(GlobeError, match="MoBE-style baseline: expert weights must be 64 positive"):
        mobe_fit(W, 4, 4, 24, weights=torch.zeros(W.shape[0]), **kw)


def test_inert_settings_are_noted(tmp_path, caplog):
    """A power without routing weights, or a text nothing reads, is said, not silently dropped."""
    import logging
    with caplog.at_level(logging.INFO):
        assert main(["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}", "train.expert_weight_power=1",
                     f"train.calib_text={FIXTURE_DIR / 'eval.txt'}", "train.steps=1", "train.families=[up]",
                     "bank.m_up=8", "bank.r=24", "sparsity.target_support=4", "train.device=cpu",
                     "bank.share=group:5"]) == 0
    assert "train.expert_weight_power=1 has no effect" in caplog.text
    assert "this fit does not use it" in caplog.text
    assert "bank.share=group:5 covers all 4 MoE layers" in caplog.text  # the fixture has 4

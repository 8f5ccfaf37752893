"""Dead (all-zero or near-zero) routed experts fit as exact zeros without disturbing the others;
experts holding NaN/inf are refused with one line naming tensor, layer and expert, before any work."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from globe.artifacts import Artifacts
from globe.config import GlobeConfig
from globe.fit.init import expert_scales
from globe.fit.loop import evaluate
from globe.fit.model import GlobeParams
from globe.io.checkpoint import Checkpoint
from globe.testing.models import save_model, tiny_model

DEAD = (1, 3)  # (position of the MoE layer, expert)


def model_with(tmp_path, name: str, fill) -> str:
    """Tiny qwen2_moe (12 experts per layer) whose expert DEAD has gate and up rows replaced by fill(shape)."""
    m = tiny_model("qwen2_moe", num_experts=12)
    L = sorted(int(k.split(".")[2]) for k in m.state_dict() if "experts.gate_up_proj" in k)[DEAD[0]]
    gu = m.model.layers[L].mlp.experts.gate_up_proj
    with torch.no_grad():
        gu[DEAD[1]] = fill(gu[DEAD[1]].shape)
    return str(save_model(m, tmp_path / name))


def cfg(path, out, **train):
    return GlobeConfig.from_dict({
        "model": {"path": path}, "output_dir": str(out), "bank": {"m_up": 6, "m_gate": 6, "r": 8},
        "sparsity": {"target_support": 3},
        "train": {"steps": 30, "batch_size": 8, "eval_every": 10, "baseline_mobe": True, "baseline_steps": 5,
                  **train}})


def fit(c):
    from globe.fit.run import run_fit
    return run_fit(c, progress=False)


def test_zero_expert_fits_exactly_zero_and_does_not_disturb_the_others(tmp_path):
    zero = model_with(tmp_path, "zero", torch.zeros)
    g = torch.Generator().manual_seed(0)
    tiny = model_with(tmp_path, "tiny", lambda sh: 1e-9 * torch.randn(sh, generator=g))  # RMS ~1e-7 of its peers
    s0, s1 = fit(cfg(zero, tmp_path / "o0")), fit(cfg(tiny, tmp_path / "o1"))
    ck = Checkpoint(zero)
    i = DEAD[0] * ck.num_experts + DEAD[1]
    a0, a1 = Artifacts.load(tmp_path / "o0"), Artifacts.load(tmp_path / "o1")
    for fam in ("up", "gate"):
        f = s0["families"][fam]
        assert math.isfinite(f["rel_fro_error"]) and f["dead_experts"] == 1 and s1["families"][fam]["dead_experts"] == 1
        for b in ("svd", "mobe"):
            assert math.isfinite(s0["baselines"][b][fam]["rel_fro_error"])
        for arts in (a0, a1):
            fa = arts.families[fam]
            assert torch.equal(fa.A[i], torch.zeros_like(fa.A[i]))  # A_i = 0: reconstruction exactly zero
            assert torch.equal(fa.reconstruct(torch.tensor([i]))[0], torch.zeros(ck.p, ck.hidden_size))
            assert int((fa.codes[i] != 0).sum()) == 1  # one stored code, no more
        # the reported error is the artifact's: the dead expert counts with its whole (zero) energy
        W = ck.load_family(fam, torch.float32)
        rel = float(((W - a0.families[fam].reconstruct()).pow(2).sum() / W.pow(2).sum()).sqrt())
        assert rel == pytest.approx(f["rel_fro_error"], rel=1e-4)
        # every other expert's bank, codes and adapters are identical whether the dead one is 0 or tiny noise
        keep = torch.arange(W.shape[0]) != i
        assert torch.equal(a0.families[fam].bank, a1.families[fam].bank)
        assert torch.equal(a0.families[fam].codes[keep], a1.families[fam].codes[keep])
        assert torch.equal(a0.families[fam].A[keep], a1.families[fam].A[keep])


def test_objective_and_error_ignore_a_dead_expert():
    """evaluate(): the objective is the mean over live experts; a zero expert adds nothing to the error."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(7, 6, 10, generator=g)
    prm = GlobeParams(torch.randn(3, 4, 10, generator=g), torch.randn(8, 3, generator=g), 1.0)
    Wz = torch.cat([W, torch.zeros(1, 6, 10)])
    a = evaluate(W, expert_scales(W), prm, 1.0)
    b = evaluate(Wz, expert_scales(Wz), prm, 1.0)
    assert b["objective"] == pytest.approx(a["objective"], rel=1e-6)
    assert b["rel_fro_error"] == pytest.approx(a["rel_fro_error"], rel=1e-6)


def test_every_expert_zero_is_refused(tmp_path):
    from globe.errors import GlobeError
    from globe.fit.loop import fit_family

    with pytest.raises(GlobeError, match="every routed expert is zero"):
        fit_family(torch.zeros(6, 4, 5), GlobeConfig.from_dict({"bank": {"m_up": 2, "r": 2},
                                                                 "sparsity": {"target_support": 1}}), "up")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_expert_refused_with_one_line(tmp_path, capsys, monkeypatch, bad):
    from globe.cli.main import main
    from globe.fit import init

    def fill(sh):
        t = torch.randn(sh) * 0.02
        t[-1, 0] = bad  # last row: an up row of the fused gate_up_proj
        return t
    path = model_with(tmp_path, "nan", fill)
    capsys.readouterr()
    ck = Checkpoint(path)
    L = ck.moe_layers[DEAD[0]]
    name = ck.expert_name(L, DEAD[1], "up")
    assert not torch.isfinite(load_file(str(ck.dir / ck.weight_map[name]))[name]).all()
    called = []
    monkeypatch.setattr(init, "spectra", lambda *a, **k: called.append(1))  # no warm start may begin
    out = tmp_path / "out"
    rc = main(["fit", f"model.path={path}", f"output_dir={out}", "bank.m_up=4", "bank.m_gate=4", "bank.r=4",
               "sparsity.target_support=2", "train.steps=2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not called
    assert err.startswith("error:") and "\n" not in err, err
    assert name in err and f"layer {L}" in err and f"expert {DEAD[1]}" in err and "non-finite" in err
    assert not out.exists()  # nothing to resume from: the claim (.globe_fit/run.json) is taken back
    out.mkdir()  # an empty directory the user made stays, empty
    assert main(["fit", f"model.path={path}", f"output_dir={out}", "bank.m_up=4", "bank.m_gate=4", "bank.r=4",
                 "sparsity.target_support=2", "train.steps=2"]) == 2
    assert out.is_dir() and not any(out.iterdir())

"""`run_fit` driver: outputs, determinism, resume, refusal of bad configs / foreign output dirs, NaN stop."""

import json

import pytest
import torch
from safetensors.torch import load_file

from globe.artifacts import Artifacts
from globe.config import GlobeConfig
from globe.errors import GlobeError
from globe.io.checkpoint import Checkpoint
from globe.testing.models import save_model, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_model(tiny_model("qwen2_moe", num_experts=12), tmp_path_factory.mktemp("m") / "tiny"))


def make_cfg(model_dir, out, **kw):
    d = {"model": {"path": model_dir}, "output_dir": str(out), "bank": {"m_up": 6, "m_gate": 6, "r": 8},
         "sparsity": {"target_support": 3}, "train": {"steps": 20, "batch_size": 8, "checkpoint_every": 5,
                                                      "eval_every": 5, "log_every": 2, "baseline_steps": 10}}
    for k, v in kw.items():
        sec, key = k.split("__")
        d.setdefault(sec, {})[key] = v
    return GlobeConfig.from_dict(d)


def tensors(out):
    """Every tensor of a fit directory (one file per family, listed in the index)."""
    idx = json.loads((out / "globe.safetensors.index.json").read_text())["weight_map"]
    t = {}
    for f in sorted(set(idx.values())):
        t.update(load_file(str(out / f)))
    assert set(t) == set(idx)
    return t


def test_outputs_and_contract(model_dir, tmp_path):
    out = tmp_path / "o"
    s = run(make_cfg(model_dir, out, train__baseline_mobe=True))
    for f in ("globe-up.safetensors", "globe-gate.safetensors", "globe.safetensors.index.json", "globe_config.json",
              "metrics.jsonl", "summary.json"):
        assert (out / f).is_file()
    assert not list((out / ".globe_fit").glob("*.safetensors"))  # staged family files were moved out
    summ = json.loads((out / "summary.json").read_text())
    assert summ == json.loads(json.dumps(s))
    ck = Checkpoint(model_dir)
    arts = Artifacts.load(out)
    for fam in ("up", "gate"):
        f = summ["families"][fam]
        for k in ("rel_fro_error", "median_support", "stored_params", "original_params"):
            assert k in f
        for b in ("svd", "mobe"):
            assert "rel_fro_error" in summ["baselines"][b][fam]
            assert summ["baselines"][b][fam]["time_s"] >= 0
        assert f["baselines_time_s"] == pytest.approx(sum(summ["baselines"][b][fam]["time_s"] for b in ("svd", "mobe")))
        # rel_fro_error recomputed from the saved artifact and the checkpoint
        W = ck.load_family(fam, torch.float32)
        What = arts.families[fam].reconstruct()
        rel = float(((W - What).pow(2).sum() / W.pow(2).sum()).sqrt())
        assert rel == pytest.approx(f["rel_fro_error"], rel=1e-4)
        assert f["stored_params"] == arts.families[fam].stored_params()
        assert f["original_params"] == W.numel()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["family"] for r in recs} == {"up", "gate"}
    for k in ("step", "loss", "rel_error", "support_median", "support_p95", "temperature", "step_time"):
        assert k in recs[0]


def run(cfg, **kw):
    from globe.fit.run import run_fit
    return run_fit(cfg, progress=False, **kw)


def test_determinism_same_seed_identical_artifacts(model_dir, tmp_path):
    s1 = run(make_cfg(model_dir, tmp_path / "a"))
    s2 = run(make_cfg(model_dir, tmp_path / "b"))
    t1, t2 = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert t1.keys() == t2.keys()
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    strip = lambda s: {f: {k: v for k, v in d.items() if not k.endswith("time_s")} for f, d in s["families"].items()}  # noqa
    assert strip(s1) == strip(s2)
    s3 = run(make_cfg(model_dir, tmp_path / "c", train__seed=1, bank__seed=1, train__families=["up"]))
    assert not torch.equal(tensors(tmp_path / "c")["globe.up.bank"], t1["globe.up.bank"])
    assert s3["families"]["up"]["rel_fro_error"] != s1["families"]["up"]["rel_fro_error"]


def kill_at(where: dict[str, int]):
    """A before_step hook that simulates a kill (KeyboardInterrupt) at {family: step}."""
    def hook(fam, step):
        if where.get(fam) == step:
            raise KeyboardInterrupt(f"interrupted at {fam} step {step}")
    return hook


@pytest.mark.parametrize("where", [{"up": 7}, {"gate": 13}])
def test_resume_after_interruption_matches_uninterrupted(model_dir, tmp_path, where, monkeypatch, caplog):
    import logging

    import globe.fit.loop as loop
    ref = run(make_cfg(model_dir, tmp_path / "ref"))
    out = tmp_path / "int"
    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt), caplog.at_level(logging.INFO, logger="globe"):
        mp.setattr(loop, "before_step", kill_at(where))
        run(make_cfg(model_dir, out))
    assert not (out / "summary.json").exists()
    fam, step = next(iter(where.items()))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit stopped")]
    assert len(said) == 1 and f"{fam} at step" in said[0] and "resumes" in said[0], said  # what a rerun resumes
    assert ("up finished" in said[0]) == ("gate" in where)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="globe"):
        res = run(make_cfg(model_dir, out))
    assert ("fit up: finished earlier" in caplog.text) == ("gate" in where)  # the resume says what it kept
    assert "fit gate: finished earlier" not in caplog.text
    assert f"fit {fam}: resuming from its checkpoint at step" in caplog.text
    for fam in ("up", "gate"):
        assert res["families"][fam]["rel_fro_error"] == ref["families"][fam]["rel_fro_error"]
    t1, t2 = tensors(tmp_path / "ref"), tensors(out)
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    steps = [(json.loads(x)["family"], json.loads(x)["step"]) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps))  # no duplicated log lines after resume


def test_interruption_before_the_first_checkpoint_leaves_a_rerunnable_dir(model_dir, tmp_path, monkeypatch, caplog):
    """Ctrl-C at step 3 of 100-step checkpoints, with metrics logged every step: nothing to resume from, so the
    claim and this run's log go (a kept log blocked the rerun as a foreign file); the rerun fits normally."""
    import logging

    import globe.fit.loop as loop
    out = tmp_path / "early"
    cfg = make_cfg(model_dir, out, train__checkpoint_every=100, train__log_every=1)
    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt), caplog.at_level(logging.INFO, logger="globe"):
        mp.setattr(loop, "before_step", kill_at({"up": 3}))
        run(cfg)
    assert not out.exists()
    assert "fit stopped before its first checkpoint (train.checkpoint_every=100): nothing kept" in caplog.text
    assert run(cfg)["families"]["up"]["steps_run"] == cfg.train.steps


def test_different_run_in_output_dir_is_refused(model_dir, tmp_path):
    out = tmp_path / "o"
    run(make_cfg(model_dir, out))
    before = (out / "globe-up.safetensors").read_bytes()
    with pytest.raises(GlobeError, match=r"different fit \(differs in bank\.m_up\)"):
        run(make_cfg(model_dir, out, bank__m_up=5))
    assert (out / "globe-up.safetensors").read_bytes() == before
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(GlobeError, match="not empty"):
        run(make_cfg(model_dir, other))


@pytest.mark.parametrize("kw,key", [
    ({"bank__r": 999}, "bank.r"), ({"sparsity__target_support": 7}, "sparsity.target_support"),
    ({"train__steps": 0}, "train.steps"), ({"bank__m_up": 0}, "bank.m_up"),
])
def test_bad_config_rejected_before_reading_weights(model_dir, tmp_path, monkeypatch, kw, key):
    def boom(*a, **k):
        raise AssertionError("weights were read")
    monkeypatch.setattr(Checkpoint, "expert", boom)
    monkeypatch.setattr(Checkpoint, "load_family", boom)
    try:
        cfg = make_cfg(model_dir, tmp_path / "o", **kw)
    except ValueError as e:  # rejected at construction already
        assert key in str(e)
        cfg = make_cfg(model_dir, tmp_path / "o")
        sec, name = key.split(".")
        setattr(getattr(cfg, sec), name, list(kw.values())[0])
    with pytest.raises(GlobeError, match=key.replace(".", r"\.")):
        run(cfg)
    assert not (tmp_path / "o" / "globe.safetensors.index.json").exists()


@pytest.mark.parametrize("kw", [{"sparsity__map": "topk"}, {"bank__activation": "relu"}])
def test_unknown_map_or_activation_rejected(model_dir, tmp_path, kw):
    with pytest.raises(ValueError, match=list(kw)[0].replace("__", r"\.")):
        make_cfg(model_dir, tmp_path, **kw)


def test_nan_loss_stops_keeps_checkpoint(model_dir, tmp_path, monkeypatch):
    import globe.fit.loop as loop
    real = loop.ridge_A
    calls = {"n": 0}

    def flaky(W, M, lam=1e-4):
        calls["n"] += 1
        A = real(W, M, lam)
        return A * float("nan") if calls["n"] > 12 else A
    monkeypatch.setattr(loop, "ridge_A", flaky)
    out = tmp_path / "o"
    with pytest.raises(GlobeError, match="NaN.*last good checkpoint"):
        run(make_cfg(model_dir, out, train__families=["up"], train__eval_every=100))
    ck = torch.load(out / ".globe_fit" / "up.ckpt.pt", weights_only=False)
    assert ck["step"] == 10 and torch.isfinite(ck["bank"]).all()  # 1 init eval call + steps 1..11 good
    assert not (out / "globe.safetensors.index.json").exists()


def test_activation_aware_objective_runs_and_is_finite(model_dir, tmp_path):
    from globe.fit import calib
    ck = Checkpoint(model_dir)
    d = ck.hidden_size
    X = torch.randn(500, d) * torch.linspace(0.1, 3, d)
    covs = {L: X.T @ X / 500 for L in ck.moe_layers}
    per = {(ck.moe_layers[0], 0): (covs[ck.moe_layers[0]], 10)}  # other experts: no tokens -> identity
    wf = calib.whitener(ck, covs, per, per_expert=True)
    L = wf(torch.arange(3))
    assert torch.isfinite(L).all() and torch.equal(L[1], torch.eye(d))
    assert torch.allclose(L[0] @ L[0].T, L[0] @ L[0].T)
    zero = calib.regularised_factor(torch.zeros(d, d))
    assert torch.equal(zero, torch.eye(d))
    from globe.fit.loop import fit_family
    W = ck.load_family("up", torch.float32)
    cfg = make_cfg(model_dir, tmp_path / "o")
    fw = fit_family(W, cfg, "up", whiten=calib.whitener(ck, covs))
    assert fw.metrics["objective"] == fw.metrics["objective"]  # not NaN

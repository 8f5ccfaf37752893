"""Experts kept uncompressed (bank.keep_fraction): chosen by gate mass, hidden from the fit, counted in the
budget and the errors, run densely by the runtime, carried by both export formats and the remote code."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from globe import compat
from globe.artifacts import Artifacts
from globe.cli.main import main
from globe.config import CacheCfg, GlobeConfig
from globe.errors import GlobeError
from globe.fit.budget import plan_rank
from globe.fit.calib import _Counts
from globe.fit.keep import keep_busiest
from globe.fixtures import FIXTURE_DIR
from globe.io.checkpoint import Checkpoint
from globe.runtime import patch_model, to_dense_model, unpatch_model
from globe.runtime.export import run_export
from globe.runtime.load import globe_layers, load_model
from globe.testing.artifacts import dense_reference, random_artifacts
from globe.testing.models import TINY, tiny_model

IDS = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model, ids=IDS):
    return model(input_ids=ids).logits


def test_keep_busiest_ranks_by_gate_mass():
    mass = torch.tensor([0.5, 3.0, 0.0, 3.0, 2.0, 0.1], dtype=torch.float64)
    assert keep_busiest(mass, 0) == []
    assert keep_busiest(mass, 1) == [1]  # a tie goes to the lower id
    assert keep_busiest(mass, 3) == [1, 3, 4]


def test_gate_mass_is_the_sum_of_squared_routing_weights():
    class Ck:
        moe_layers, num_experts = [0, 1], 3
    c = _Counts(Ck())
    top = torch.tensor([[0, 2], [2, 1]])
    w = torch.tensor([[0.5, 0.25], [0.75, 0.1]])
    c.make(1, None)(None, top, w)
    want = torch.tensor([0, 0, 0, 0.25, 0.01, 0.0625 + 0.5625], dtype=torch.float64)
    assert torch.allclose(c.mass, want) and c.result().tolist() == [0, 0, 0, 1, 1, 2]


def test_budget_counts_the_kept_experts():
    N, p, d = 64, 16, 24
    plain = plan_rank(N, p, d, 8, 2, budget=0.5, multiple=1)
    kept = plan_rank(N, p, d, 8, 2, budget=0.5, multiple=1, kept=6)
    assert kept.r < plain.r and kept.predicted <= 0.5
    assert kept.predicted == pytest.approx(plan_rank(N, p, d, 8, 2, r=kept.r).predicted + 6 / N)


@pytest.fixture(scope="module")
def kept_fit(tmp_path_factory):
    out = tmp_path_factory.mktemp("keep") / "fit"
    assert main(["fit", f"model.path={FIXTURE_DIR}", f"output_dir={out}", "bank.keep_fraction=0.1", "bank.budget=0.5",
                 f"train.calib_text={FIXTURE_DIR / 'eval.txt'}", "train.calib_tokens=256", "train.steps=6",
                 "bank.r_multiple=1"]) == 0
    return out


def test_fit_hides_kept_experts_and_reports_errors_over_all(kept_fit):
    s = json.loads((kept_fit / "summary.json").read_text())
    arts = Artifacts.load(kept_fit)
    ck = Checkpoint(FIXTURE_DIR)
    N, p, d = len(ck.moe_layers) * ck.num_experts, ck.p, ck.hidden_size
    kept = arts.kept
    assert len(kept) == round(0.1 * N) == s["keep"]["kept"] and s["keep"]["gate_mass_share"] > len(kept) / N
    for f, fa in arts.families.items():
        assert all(int((fa.codes[i] != 0).sum()) == 1 for i in kept)  # a dead expert's single code
        assert fa.A[kept].abs().max() == 0
        W = ck.load_family(f, torch.float32)  # (N, p, d)
        Wh = fa.reconstruct()
        Wh[kept] = W[kept]  # what the runtime and the exports use
        err = float((W - Wh).norm() / W.norm())
        rest = [i for i in range(N) if i not in kept]
        fitted = float((W[rest] - Wh[rest]).norm() / W[rest].norm())
        fm = s["families"][f]
        assert fm["rel_fro_error"] == pytest.approx(err, rel=1e-4)
        assert fm["rel_fro_error_fitted"] == pytest.approx(fitted, rel=1e-4) and err < fitted
        assert fm["stored_params"] == fa.stored_params() and fm["kept_experts"] == len(kept)
        n_, m, _, r, _ = fa.shape  # worked out from the format's formula: banks, A, codes, gain, kept experts
        assert fa.stored_params() == fa.n_banks * (m * r * d + 1) + N * p * r + fa.nnz() + len(kept) * p * d
        svd = s["baselines"]["svd"][f]  # every expert, kept ones included, at the fit's total stored size
        sv = torch.linalg.svdvals(W)  # (N, min(p, d))
        want = float((sv[:, svd["rank"]:].pow(2).sum() / sv.pow(2).sum()).sqrt())
        assert svd["rel_fro_error"] == pytest.approx(want, rel=1e-4)
    assert s["budget"]["achieved"] <= 0.5


def test_kept_fit_runs_and_exports_like_its_dense_reference(kept_fit, tmp_path):
    from transformers import AutoModelForCausalLM

    arts = Artifacts.load(kept_fit)
    src = AutoModelForCausalLM.from_pretrained(str(FIXTURE_DIR), dtype=torch.float32).eval()
    ref = _logits(dense_reference(copy.deepcopy(src), arts))
    patch_model(src, arts)
    torch.testing.assert_close(_logits(src), ref, rtol=1e-5, atol=1e-5)
    cfg = {"model": {"path": str(FIXTURE_DIR)}, "artifacts": str(kept_fit)}
    g = run_export(GlobeConfig.from_dict({**cfg, "output_dir": str(tmp_path / "g"), "export": {"dtype": "fp32"}}))
    assert torch.equal(_logits(load_model(g)), _logits(src))
    dn = run_export(GlobeConfig.from_dict({**cfg, "output_dir": str(tmp_path / "d"), "export": {"format": "dense",
                                                                                                 "dtype": "fp32"}}))
    ck, ckd = Checkpoint(FIXTURE_DIR), Checkpoint(dn)
    E = ck.num_experts
    for i in arts.kept:  # kept experts: the source's weights, bit for bit
        L, e = ck.moe_layers[i // E], i % E
        assert all(torch.equal(ck.expert(L, e, f), ckd.expert(L, e, f)) for f in ("up", "gate"))
    dense = AutoModelForCausalLM.from_pretrained(str(dn), dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(dense), ref, rtol=1e-5, atol=1e-5)
    card = (g / "README.md").read_text()
    assert f"{len(arts.kept)} of " in card and "keep their original gate and up" in card
    from globe.eval.diagnostics import recon_stats
    from globe.io.inspect import format_table, inspect

    s = json.loads((kept_fit / "summary.json").read_text())
    info = inspect(str(g))  # headers only: the same stored size as the fit's summary, kept experts counted
    for f in ("up", "gate"):
        assert info["families"][f]["stored_params"] == s["families"][f]["stored_params"]
        st = recon_stats(arts.families[f], arts, ck, f)  # the errors eval reports: kept experts exact
        assert st["rel_fro_error"] == pytest.approx(s["families"][f]["rel_fro_error"], rel=1e-4)
    assert re.search(rf"kept experts +{len(arts.kept)} of", format_table(info))


@pytest.mark.parametrize("mt", sorted(TINY))
def test_kept_experts_run_densely_in_every_cache_mode(mt):
    model = tiny_model(mt)
    E = compat.experts_info(compat.get_experts(model, compat.moe_layer_ids(model)[0])).num_experts
    fams = ("up",) if mt == "olmoe" else ("up", "gate")
    arts = random_artifacts(model, families=fams, m=5, r=8, support=3, seed=1, kept=[0, E + 1, E + 2])
    ref = _logits(dense_reference(copy.deepcopy(model), arts))
    without = copy.deepcopy(arts)
    for fa in without.families.values():
        fa.kept = []
    outs = {}
    for mode in ("full", "lru", "none"):
        patch_model(model, arts, CacheCfg(mode=mode, S_per_layer=2, warmup_tokens=16))
        outs[mode] = _logits(model)
        for mod in globe_layers(model).values():  # kept experts: no block, Down read in place
            assert mod._kept_layer().down is mod.down_proj
            if mode == "full":
                assert mod.table.shape[0] == E - len(mod.kept_ids) == len(mod.cached_experts())
                assert mod.cache_nbytes() == (E - len(mod.kept_ids)) * mod.table[0].numel() * mod.table.element_size()
        if mode == "full":  # each expert's weight read back from the compact table (W_hat) is the reference's
            torch.testing.assert_close(_logits(to_dense_model(copy.deepcopy(model))), ref, rtol=1e-5, atol=1e-5)
        unpatch_model(model)
    patch_model(model, arts, CacheCfg(mode="full", compose_full=True))  # table blocks (p, d): A tilde_B
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(to_dense_model(copy.deepcopy(model))), ref, rtol=1e-5, atol=1e-5)
    unpatch_model(model)
    torch.testing.assert_close(outs["full"], ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(outs["lru"], outs["full"]) and torch.equal(outs["none"], outs["full"])
    patch_model(model, without)  # the same artifacts run without keeping: kept experts' A is zero, differs
    assert not torch.allclose(_logits(model), ref, atol=1e-4)


def test_kept_export_in_bf16_opens_with_remote_code(tiny_dirs, tmp_path):
    from test_remote_code import _remote_logits

    model, src = tiny_dirs["qwen2_moe"]
    arts = random_artifacts(model, m=4, r=6, support=2, seed=5, kept=[1, 2, 9])
    arts.save(tmp_path / "arts")
    out = run_export(GlobeConfig.from_dict({"model": {"path": str(src)}, "artifacts": str(tmp_path / "arts"),
                                            "output_dir": str(tmp_path / "g"), "export": {"dtype": "bf16"}}))
    remote = _remote_logits(out, IDS, tmp_path)
    assert torch.equal(remote, _logits(load_model(out)))


@pytest.mark.parametrize("over, key", [(["bank.keep_fraction=0.5"], "bank.keep_fraction"),
                                       (["bank.keep_fraction=0.3", "bank.budget=0.3"], "bank.keep_fraction"),
                                       (["bank.keep_fraction=0.1"], "train.calib_text")])
def test_bad_keep_settings_are_one_line(capsys, tmp_path, over, key):
    out = tmp_path / "o"
    assert main(["fit", f"model.path={FIXTURE_DIR}", f"output_dir={out}", *over]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and not out.exists()


def test_damaged_kept_lists_are_refused(tiny_dirs, tmp_path):
    model, src = tiny_dirs["qwen2_moe"]
    arts = random_artifacts(model, m=4, r=6, support=2, seed=5, kept=[1, 2])
    arts.save(tmp_path / "arts")
    meta = json.loads((tmp_path / "arts" / "globe_config.json").read_text())
    meta["families"]["up"]["kept"] = [2, 1]
    (tmp_path / "arts" / "globe_config.json").write_text(json.dumps(meta))
    with pytest.raises(GlobeError, match="kept experts"):
        Artifacts.load(tmp_path / "arts")
    meta["families"]["up"]["kept"] = [1, 3]  # differs from gate's, and expert 3 holds fitted codes
    (tmp_path / "arts" / "globe_config.json").write_text(json.dumps(meta))
    with pytest.raises(GlobeError, match="keep different experts|placeholder"):
        Artifacts.load(tmp_path / "arts")
    arts.save(tmp_path / "ok")
    out = run_export(GlobeConfig.from_dict({"model": {"path": str(src)}, "artifacts": str(tmp_path / "ok"),
                                            "output_dir": str(tmp_path / "g")}))
    conf = json.loads((out / "config.json").read_text())
    conf["globe"]["families"]["gate"]["kept"] = [1]
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(GlobeError, match="families.(gate|up).kept differs"):
        load_model(out)


def test_a_fraction_that_keeps_nothing_is_said(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="globe"):
        assert main(["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}", "bank.keep_fraction=0.005",
                     f"train.calib_text={FIXTURE_DIR / 'eval.txt'}", "train.calib_tokens=128", "train.steps=2",
                     "train.baselines=false"]) == 0
    assert "rounds to 0: no expert is kept" in caplog.text
    assert Artifacts.load(tmp_path / "o").kept == []


def test_fits_that_keep_different_experts_are_not_merged(tiny_dirs, tmp_path, capsys):
    model, src = tiny_dirs["qwen2_moe"]
    random_artifacts(model, families=("up",), m=4, r=6, support=2, seed=5, kept=[1, 2]).save(tmp_path / "up")
    random_artifacts(model, families=("gate",), m=4, r=6, support=2, seed=6).save(tmp_path / "gate")
    with pytest.raises(GlobeError, match="keep different experts"):
        Artifacts.load([tmp_path / "up", tmp_path / "gate"])
    out = tmp_path / "x"  # Hydra's list syntax and the comma form both name the two directories
    for arts in (f"[{tmp_path / 'up'},{tmp_path / 'gate'}]", f"{tmp_path / 'up'},{tmp_path / 'gate'}"):
        assert main(["export", f"model.path={src}", f"artifacts={arts}", f"output_dir={out}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "keep different experts" in err[-1] and not out.exists()


def test_kept_lists_that_contradict_the_fit_are_refused(kept_fit, tiny_dirs, tmp_path):
    import shutil

    def damaged(src, kept):
        d = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, d)
        meta = json.loads((d / "globe_config.json").read_text())
        for fm in meta["families"].values():
            fm["kept"] = kept(fm["kept"])
        (d / "globe_config.json").write_text(json.dumps(meta))
        return d
    with pytest.raises(GlobeError, match="expected distinct ascending expert ids"):
        Artifacts.load(damaged(kept_fit, lambda k: [True, 21]))  # a bool is not an expert id
    with pytest.raises(GlobeError, match="listed as kept, but the fit's bank.keep_fraction=0.1 keeps"):
        Artifacts.load(damaged(kept_fit, lambda k: None))  # the fit config says how many were kept
    model, _ = tiny_dirs["qwen2_moe"]
    random_artifacts(model, m=4, r=6, support=2, seed=5, kept=[1, 2]).save(tmp_path / "arts")
    with pytest.raises(GlobeError, match="hold fitted codes"):  # experts with 2 codes are not kept ones
        Artifacts.load(damaged(tmp_path / "arts", lambda k: [i + 2 for i in k]))


def test_remote_code_names_a_misshaped_tensor(tiny_dirs, tmp_path):
    import os
    import subprocess
    import sys

    model, src = tiny_dirs["qwen2_moe"]
    random_artifacts(model, m=4, r=6, support=2, seed=5, kept=[1, 2, 9]).save(tmp_path / "arts")
    out = run_export(GlobeConfig.from_dict({"model": {"path": str(src)}, "artifacts": str(tmp_path / "arts"),
                                            "output_dir": str(tmp_path / "g")}))
    conf = json.loads((out / "config.json").read_text())
    for fm in conf["globe"]["families"].values():
        fm["kept"] = [1, 9]  # layer 0 now expects 1 kept expert; its tensors hold 2
    (out / "config.json").write_text(json.dumps(conf))
    code = ("import sys; sys.modules['globe'] = None\nfrom transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "modeling_globe.GlobeError: " in last and "shape differs" in last
    with pytest.raises(GlobeError, match="shape"):
        load_model(out)


def test_inspect_names_kept_tensors_the_config_does_not_describe(tiny_dirs, tmp_path):
    from globe.io.inspect import inspect

    model, src = tiny_dirs["qwen2_moe"]
    random_artifacts(model, m=4, r=6, support=2, seed=5, kept=[1, 2]).save(tmp_path / "arts")
    out = run_export(GlobeConfig.from_dict({"model": {"path": str(src)}, "artifacts": str(tmp_path / "arts"),
                                            "output_dir": str(tmp_path / "g")}))
    assert inspect(str(out))["families"]["up"]["kept_experts"] == 2
    conf = json.loads((out / "config.json").read_text())
    for fm in conf["globe"]["families"].values():
        fm["kept"] = []  # the kept_{f} tensors stay in the files
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(GlobeError, match=r"kept_(gate|up) is not described by config.json"):
        inspect(str(out))

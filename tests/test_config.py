"""Typed configs: defaults valid, bad values rejected with the key named, Hydra YAML == dataclasses."""

from __future__ import annotations

import dataclasses

import pytest

from globe.cli.main import compose, expand_sweep
from globe.config import BankCfg, CacheCfg, GlobeConfig, SparsityCfg, TrainCfg
from globe.fixtures import FIXTURE_DIR


def test_defaults_valid_and_yaml_matches_dataclass_defaults():
    conf = compose(["cache=full"])  # the cache group applies only when the command line names it
    ref = GlobeConfig(cache=CacheCfg())
    for section in ("bank", "sparsity", "train", "cache", "export", "wandb", "eval"):
        got, want = dataclasses.asdict(getattr(conf, section)), dataclasses.asdict(getattr(ref, section))
        assert got == want, section
    assert compose([]).cache is None  # an export's saved cache settings then apply (load_model)
    assert compose(["cache=lru"]).cache.mode == "lru" and compose(["cache=none"]).cache.mode == "none"
    assert compose(["cache.S_per_layer=8"]).cache == CacheCfg(S_per_layer=8)
    assert conf.model.path == ""  # no silent default model: the verbs refuse (test_model_path_required)
    conf = compose([f"model.path={FIXTURE_DIR}"])
    assert conf.eval.text.endswith("eval.txt")  # filled from the model dir's eval.txt by the CLI


@pytest.mark.parametrize("verb", ["fit", "export", "eval", "generate"])
def test_model_path_required(verb, tmp_path, capsys):
    from globe.cli.main import main

    rc = main([verb, f"output_dir={tmp_path / 'o'}", f"artifacts={tmp_path}", "prompt=hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "model.path is required" in err[0], err
    assert not (tmp_path / "o").exists()


def test_artifacts_list_from_the_command_line(tmp_path):
    (tmp_path / "a,b").mkdir()
    assert compose(["artifacts=u/x, g/y"]).artifacts == ["u/x", "g/y"]
    assert compose([f"artifacts={tmp_path / 'a,b'}"]).artifacts == str(tmp_path / "a,b")  # an existing dir: verbatim


@pytest.mark.parametrize("cls,kw,key", [
    (BankCfg, {"m_up": 0}, "bank.m_up"), (BankCfg, {"r": 0}, "bank.r"),
    (BankCfg, {"activation": "gelu"}, "bank.activation"),
    (SparsityCfg, {"map": "topk"}, "sparsity.map"), (SparsityCfg, {"target_support": 0}, "sparsity.target_support"),
    (TrainCfg, {"steps": 0}, "train.steps"), (TrainCfg, {"families": ["down"]}, "train.families"),
    (TrainCfg, {"objective": "activation"}, "train.calib_text"),
])
def test_bad_values_name_the_key(cls, kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cls(**kw)


def test_shape_checks():
    c = GlobeConfig(bank=BankCfg(r=200, m_up=4, m_gate=4), sparsity=SparsityCfg(target_support=2))
    with pytest.raises(ValueError, match="bank.r"):
        c.check_shapes(p=88, d=128, n_experts=64)
    c = GlobeConfig(bank=BankCfg(m_up=4, m_gate=4), sparsity=SparsityCfg(target_support=6))
    with pytest.raises(ValueError, match="sparsity.target_support"):
        c.check_shapes(p=88, d=128, n_experts=64)
    GlobeConfig(bank=BankCfg(m_up=8, m_gate=8), sparsity=SparsityCfg(target_support=6)).check_shapes(88, 128, 64)


def test_families_normalised_and_roundtrip():
    c = GlobeConfig.from_dict({"train": {"families": ["gate", "up"]}})
    assert c.train.families == ["up", "gate"]
    assert GlobeConfig.from_dict(c.to_dict()) == c


def test_sweep_expansion():
    runs = expand_sweep(["bank.m_up=16,32", "sparsity.target_support=8,12", "output_dir=x", "train.families=[up,gate]"])
    assert len(runs) == 4 and ["bank.m_up=32", "sparsity.target_support=12", "output_dir=x",
                               "train.families=[up,gate]"] in runs


def test_public_api_names_resolve():
    import globe
    import globe.fit  # noqa: F401  (the subpackage must not shadow a public function)

    assert callable(globe.compress) and callable(globe.patch_model) and callable(globe.load_model)
    assert callable(globe.export) and callable(globe.inspect) and callable(globe.unpatch_model)

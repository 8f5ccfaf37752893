"""Bad input found by a bad-input trial: each is one line and exit 2, before any work (nothing written)."""

from __future__ import annotations

import shutil

import pytest
from cli_helpers import one_line

from globe.config import GlobeConfig, TrainCfg
from globe.fixtures import FIXTURE_DIR


@pytest.mark.parametrize("kv,key", [("bank.m_up=abc", "bank.m_up"), ("bank.m_up=true", "bank.m_up"),
                                    ("bank.m_up=1.5", "bank.m_up"), ("train.lr=inf", "train.lr"),
                                    ("train.lr=1e309", "train.lr"), ("train.betas=[2,3]", "train.betas"),
                                    ("train.steps=abc", "train.steps"), ("max_new_tokens=abc", "max_new_tokens")])
def test_config_numbers_named(kv, key, capsys, tmp_path):
    out = tmp_path / "o"
    msg = one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={out}", kv])
    assert key in msg and not out.exists()


def test_python_configs_check_numbers():
    with pytest.raises(ValueError, match="train.lr"):
        TrainCfg(lr=float("inf"))
    with pytest.raises(ValueError, match="bank.m_up"):
        GlobeConfig.from_dict({"bank": {"m_up": "x"}})
    assert GlobeConfig.from_dict({"bank": {"m_up": "8"}}).bank.m_up == 8  # a number given as text is fine


def test_eval_and_generate_on_a_damaged_shard(tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(FIXTURE_DIR, d)
    w = d / "model.safetensors"
    with open(w, "r+b") as f:
        f.truncate(w.stat().st_size // 2)
    for argv in (["eval", f"model.path={d}", f"eval.text={FIXTURE_DIR / 'eval.txt'}", "eval.max_tokens=64"],
                 ["generate", f"model.path={d}", "prompt=hi"]):
        line = one_line(capsys, argv)  # the headers are checked before transformers reads the file
        assert "truncated safetensors file" in line and str(d) in line, line


def test_missing_tokenizer_named(tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(FIXTURE_DIR, d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (d / f).unlink(missing_ok=True)
    for argv in (["eval", f"model.path={d}", f"eval.text={FIXTURE_DIR / 'eval.txt'}"],
                 ["generate", f"model.path={d}", "prompt=hi", "max_new_tokens=2"]):
        assert "no tokenizer files" in one_line(capsys, argv)


def test_demo_out_must_be_new_or_empty(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert "demo --out" in one_line(capsys, ["demo", "--out", str(f), "--fast"])
    d = tmp_path / "full"
    d.mkdir()
    (d / "x").write_text("x")
    one_line(capsys, ["demo", "--out", str(d), "--fast"])
    assert sorted(p.name for p in d.iterdir()) == ["x"]

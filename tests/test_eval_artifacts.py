"""`globe eval` / `globe generate` with artifacts= patch the original checkpoint on the fly (a new user
found them silently ignored): the perplexity equals that of the globe export of the same fit."""

from __future__ import annotations

import json

import pytest

from globe.cli.main import main
from globe.fixtures import FIXTURE_DIR


@pytest.mark.slow
def test_eval_and_generate_apply_artifacts(tmp_path, capsys):
    fit, out = tmp_path / "fit", tmp_path / "g"
    assert main(["fit", f"model.path={FIXTURE_DIR}", f"output_dir={fit}", "train.steps=6", "train.eval_every=6",
                 "bank.m_up=4", "bank.m_gate=4", "sparsity.target_support=2", "train.baselines=false"]) == 0
    assert main(["export", f"model.path={FIXTURE_DIR}", f"artifacts={fit}", f"output_dir={out}",
                 "export.dtype=fp32"]) == 0
    capsys.readouterr()
    res = {}
    for name, args in (("orig", []), ("patched", [f"artifacts={fit}"]), ("export", None)):
        path = out if args is None else FIXTURE_DIR
        assert main(["eval", f"model.path={path}", f"eval.text={FIXTURE_DIR / 'eval.txt'}", "eval.max_tokens=300",
                     "eval.dtype=fp32", f"output={tmp_path / name}.json", *(args or [])]) == 0
        res[name] = json.loads((tmp_path / f"{name}.json").read_text())
    capsys.readouterr()
    assert res["patched"]["model_kind"] == "globe"
    assert res["patched"]["perplexity"] == pytest.approx(res["export"]["perplexity"], rel=1e-4)
    assert res["patched"]["perplexity"] != pytest.approx(res["orig"]["perplexity"], rel=1e-4)
    gens = {}
    for name, args in (("patched", [f"artifacts={fit}"]), ("export", None)):
        path = out if args is None else FIXTURE_DIR
        assert main(["generate", f"model.path={path}", "prompt=def main(", "max_new_tokens=12", "generate.dtype=fp32",
                     *(args or [])]) == 0
        gens[name] = capsys.readouterr().out
    assert gens["patched"] == gens["export"]
    # artifacts= on an export is refused, not ignored
    assert main(["eval", f"model.path={out}", f"artifacts={fit}", f"eval.text={FIXTURE_DIR / 'eval.txt'}"]) == 2

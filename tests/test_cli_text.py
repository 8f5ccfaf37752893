"""Free text on the command line (prompts, paths) passes through unchanged; Hydra keeps the config keys.

Issue 9: `globe generate model.path=... prompt="def f(x):"` failed with Hydra's
`bad override: mismatched input '('`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from globe.cli.main import DATA_KEYS, compose, expand_sweep, main, split_data
from globe.testing.models import FIXTURE_DIR

NASTY = [
    "def f(x):", 'a = {"k": [1, 2]}, b', "${x} $HOME ${oc.env:HOME} ${bank.m_up}", "it's a \"quote\" inside",
    "x=y,z", "  spaced  out  ", "[1,2]", "{}", "#not a comment", "back\\slash\\n", "ünïcode ∑ 字", "(a,b)=c;",
    "-m", "--debug-ish", "'unbalanced", "null-ish", "",
]


@pytest.mark.parametrize("text", NASTY)
def test_prompt_verbatim(text):
    assert compose([f"prompt={text}"]).generate.prompt == text


@pytest.mark.parametrize("key", ["model.path", "output_dir", "artifacts", "output", "eval.text", "train.calib_text",
                                 "wandb.run_name"])
def test_path_keys_verbatim(key, tmp_path):
    odd = "/tmp/my runs (v2)/[a,b] {c}=${x} $y it's/out,1"
    if key == "artifacts":  # a comma splits a list of fit directories unless the whole value is a directory
        odd = str(tmp_path / "my runs (v2)" / "[a,b] {c}=${x} $y it's" / "out,1")
        Path(odd).mkdir(parents=True)
    conf = compose([f"{key}={odd}"]).to_dict()
    node = conf
    for part in key.split("."):
        node = node[part]
    assert node == odd


def test_outer_quotes_and_null():
    data, rest = split_data(['artifacts="A,B"', "output='x y'", 'generate.prompt=""hi""', "output_dir=null",
                             "prompt2=1",
                             "bank.m_up=4"])
    assert data == {"artifacts": "A,B", "output": "x y", "generate.prompt": '"hi"', "output_dir": None}
    assert rest == ["prompt2=1", "bank.m_up=4"]
    assert compose(["prompt=null"]).generate.prompt == "null"
    assert compose(["model.revision=null"]).model.revision is None


def test_config_keys_still_hydra():
    conf = compose(["bank.m_up=16", "bank.m_gate=${bank.m_up}", "train.families=[up]", "prompt=${bank.m_up}"])
    assert conf.bank.m_gate == 16 and conf.train.families == ["up"] and conf.generate.prompt == "${bank.m_up}"
    assert expand_sweep(["bank.m_up=2,3", "output_dir=a,b", "model.path=x,y"]) == [
        ["bank.m_up=2", "output_dir=a,b", "model.path=x,y"], ["bank.m_up=3", "output_dir=a,b", "model.path=x,y"]]
    assert set(DATA_KEYS) >= {"generate.prompt", "model.path", "output_dir", "artifacts", "output", "eval.text",
                              "train.calib_text"}


def test_bad_config_override_still_one_line(capsys):
    rc = main(["generate", f"model.path={FIXTURE_DIR}", "prompt=hi", "bank.m_up=(oops"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: bad override") and "\n" not in err


@pytest.mark.parametrize("prompt", ["def f(x):", 'print({"a": [1, (2, 3)]}, sep=", ")  # $HOME ${x}'])
def test_generate_end_to_end(capsys, prompt):
    rc = main(["generate", f"model.path={FIXTURE_DIR}", f"prompt={prompt}", "max_new_tokens=3"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith(prompt) and len(out.rstrip("\n")) > len(prompt)


def test_odd_paths_end_to_end(capsys, tmp_path, tiny_dirs):
    """fit -m, eval output=... with paths full of Hydra syntax; the sweep splits config keys only."""
    odd = tmp_path / "m (v2) [a,b] {c}=${x} $y it's \"q\""
    shutil.copytree(tiny_dirs["qwen2_moe"][1], odd)
    out = tmp_path / "runs, (1) ${bank.m_up}"
    rc = main(["fit", "-m", f"model.path={odd}", f"output_dir={out}", "bank.m_up=2,3", "bank.m_gate=2", "bank.r=4",
               "sparsity.target_support=1", "train.steps=2", "train.eval_every=1", "train.baselines=false"])
    assert rc == 0, capsys.readouterr().err
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 2 and all((p / "globe.safetensors.index.json").is_file() for p in runs)
    assert json.loads((runs[0] / "summary.json").read_text())["families"]["up"]["m"] == 2
    capsys.readouterr()
    fx = tmp_path / "fixture {copy}, $HOME (x)=y"
    shutil.copytree(FIXTURE_DIR, fx)
    dest = tmp_path / "eval out, ${x} (1).json"
    rc = main(["eval", f"model.path={fx}", f"eval.text={fx / 'eval.txt'}", "eval.max_tokens=64", f"output={dest}"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(dest.read_text())
    assert res["model_path"] == str(fx) and res["tokens"] > 0

"""Bad checkpoints and configs: one line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from globe.cli.main import main


def run(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_path(capsys, tmp_path):
    rc, err = run(capsys, "inspect", str(tmp_path / "nope"))
    assert rc == 2 and err.startswith("error:") and "not found" in err and "\n" not in err


def test_dir_without_config(capsys, tmp_path):
    rc, err = run(capsys, "inspect", str(tmp_path))
    assert rc == 2 and "no config.json" in err


def test_dense_model(capsys, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path)
    rc, err = run(capsys, "inspect", str(tmp_path))
    assert rc == 2 and "dense model" in err


def test_missing_expert_tensors_named(capsys, tmp_path, tiny_dirs):
    d = _copy(tiny_dirs["qwen2_moe"][1], tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    for k in [k for k in sd if ".experts.3." in k]:
        del sd[k]
    save_file(sd, str(d / "model.safetensors"))
    rc, err = run(capsys, "inspect", str(d))
    assert rc == 2 and "missing expert tensors" in err and "experts.3." in err and "more" in err


def test_shape_disagrees_with_config(capsys, tmp_path, tiny_dirs):
    d = _copy(tiny_dirs["qwen2_moe"][1], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    rc, err = run(capsys, "inspect", str(d))
    assert rc == 2 and "shape" in err and "config.json implies" in err


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_safetensors(capsys, tmp_path, tiny_dirs, cut):
    d = _copy(tiny_dirs["mixtral"][1], tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * cut)])
    rc, err = run(capsys, "inspect", str(d))
    assert rc == 2 and "corrupt or truncated" in err


def test_corrupt_header(capsys, tmp_path, tiny_dirs):
    d = _copy(tiny_dirs["olmoe"][1], tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    rc, err = run(capsys, "inspect", str(d))
    assert rc == 2 and "corrupt or truncated" in err


@pytest.mark.parametrize("override,key", [
    ("bank.m_up=0", "bank.m_up"), ("sparsity.map=nope", "sparsity.map"), ("bank.activation=relu6", "bank.activation"),
    ("train.steps=0", "train.steps"), ("bank.nokey=1", "bank.nokey"),
])
def test_bad_fit_config_rejected_before_reading(capsys, tmp_path, override, key):
    out = tmp_path / "out"
    rc, err = run(capsys, "fit", f"model.path={tmp_path / 'does-not-exist'}", f"output_dir={out}", override)
    assert rc == 2 and key in err and not out.exists()


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "globe.cli.main", "inspect", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "globe.cli.main", "--debug", "inspect", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" in r.stderr

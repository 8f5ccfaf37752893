"""A globe export opens with plain transformers (trust_remote_code) in a process that cannot import
globe, with logits equal to `globe.load_model`, on every registry architecture; lm-eval's `hf` model
scores it by path; the model card says what it is and how to load it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from globe.config import GlobeConfig
from globe.runtime.export import run_export as export
from globe.runtime.load import load_model
from globe.runtime.remote import MODULE_FILE
from globe.testing.artifacts import random_artifacts
from globe.testing.models import TINY, fixture_path

RUNNER = r"""
import sys, json, torch
sys.modules["globe"] = None  # any `import globe` now fails: the export must stand alone
from transformers import AutoModelForCausalLM
out, ids_path, res_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
ids = torch.load(ids_path)
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, res_path)
print(type(model).__name__, model.dtype)
"""


def _remote_logits(out: Path, ids: torch.Tensor, tmp: Path) -> torch.Tensor:
    torch.save(ids, tmp / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", RUNNER, str(out), str(tmp / "ids.pt"), str(tmp / "res.pt")],
                       capture_output=True, text=True, env=env, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("GlobeForCausalLM")
    return torch.load(tmp / "res.pt")


def _export(src, arts_dir, out, **kw):
    return export(GlobeConfig.from_dict(dict(model=dict(path=str(src)), artifacts=str(arts_dir),
                                             output_dir=str(out), export=kw)))


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_remote_code_equals_load_model(tiny_dirs, tmp_path, model_type):
    model, src = tiny_dirs[model_type]
    arts = random_artifacts(model, families=("up",) if model_type == "olmoe" else ("up", "gate"), m=4, r=6,
                            support=2, seed=11, banks=2)
    arts.save(tmp_path / "arts")
    out = _export(src, tmp_path / "arts", tmp_path / "g", dtype="bf16")
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == f"globe_{model_type}" and (out / MODULE_FILE).is_file()
    src_text = (out / MODULE_FILE).read_text()
    assert not [ln for ln in src_text.splitlines() if ln.startswith(("import globe", "from globe\b", "from .."))]
    assert "\nfrom globe" not in src_text and "\nimport globe" not in src_text
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    remote = _remote_logits(out, ids, tmp_path)
    with torch.no_grad():
        ref = load_model(out)(input_ids=ids).logits
    assert remote.dtype == torch.bfloat16 and torch.equal(remote, ref)


def test_model_card_and_lm_eval_by_path(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from globe import compat
    fx = fixture_path()
    base = compat.load_pretrained(fx, torch.float32)
    arts = random_artifacts(base, m=8, r=44, support=3, seed=9)
    arts.save(tmp_path / "arts")
    (tmp_path / "arts" / "summary.json").write_text(json.dumps({"families": {
        f: {"rel_fro_error": 0.25, "stored_params": 10, "original_params": 40} for f in ("up", "gate")}}))
    out = _export(fx, tmp_path / "arts", tmp_path / "g", dtype="fp32")
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "globe.load_model" in card and str(fx) in card
    assert "| up | 8 | 1 | 44 |" in card and "0.2500" in card and "25.0%" in card
    tasks = Path(__file__).parent / "data" / "lm_eval_tasks"
    args = f"pretrained={out},trust_remote_code=True,dtype=float32,device=cpu"
    res = lm_eval.simple_evaluate(model="hf", model_args=args,
                                  tasks=["globe_fixture_mc"], num_fewshot=0, limit=6,
                                  task_manager=TaskManager(include_path=str(tasks)))
    acc = res["results"]["globe_fixture_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and res["results"]["globe_fixture_mc"]["sample_len"] == 6


def test_remote_code_honours_cache_compile(tiny_dirs, tmp_path):
    """An export saved with cache.compile=true composes with the fused kernel in both loaders: the logits
    agree to a few float32 roundings. Not bitwise: the remote loader compiles in a fresh process, while
    this process may hold other torch threads settings and compiled kernels from earlier tests, and
    Inductor's CPU code (its reduction order) depends on them (seen once in CI: equal to 4 decimals, not
    in every bit). A wrong kernel or wrong codes would differ by orders of magnitude more."""
    model, src = tiny_dirs["qwen2_moe"]
    random_artifacts(model, m=4, r=6, support=3, seed=12).save(tmp_path / "arts")
    out = export(GlobeConfig.from_dict(dict(model=dict(path=str(src)), artifacts=str(tmp_path / "arts"),
                                            output_dir=str(tmp_path / "g"), export=dict(dtype="fp32"),
                                            cache=dict(mode="none", compile=True))))
    assert json.loads((out / "config.json").read_text())["globe"]["cache"]["compile"] is True
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    remote = _remote_logits(out, ids, tmp_path)
    loaded = load_model(out)
    assert {loaded.globe[f].kernel for f in loaded.globe} == {"compiled"}
    with torch.no_grad():
        ref = loaded(input_ids=ids).logits
    assert float((remote - ref).abs().max()) <= 16 * torch.finfo(torch.float32).eps * float(ref.abs().max())


@pytest.mark.parametrize("damage", ["drop_A", "drop_norm", "nan_bank", "extra", "zero_gain"])
def test_remote_code_refuses_a_damaged_export(tiny_dirs, tmp_path, damage):
    """What globe.load_model refuses, plain transformers with the generated code refuses too: a missing
    tensor (transformers would leave it random or empty) or NaN in a weight; the error names the tensor."""
    from safetensors.torch import load_file, save_file

    model, src = tiny_dirs["qwen2_moe"]
    random_artifacts(model, m=4, r=6, support=2, seed=11).save(tmp_path / "arts")
    out = _export(src, tmp_path / "arts", tmp_path / "g", dtype="fp32")
    f = out / "model.safetensors"
    t = load_file(str(f))
    name = {"drop_A": next(k for k in t if ".A_" in k), "drop_norm": "model.norm.weight",
            "nan_bank": next(k for k in t if k.endswith("up.bank")), "extra": "model.layers.0.foo.weight",
            "zero_gain": next(k for k in t if k.endswith("up.gain"))}[damage]
    if damage == "nan_bank":
        t[name] = t[name].clone()
        t[name].view(-1)[0] = float("nan")
    elif damage == "extra":
        t[name] = torch.ones(3)
    elif damage == "zero_gain":  # every expert silu(0) = 0: refused at load, not at the first forward
        t[name] = torch.zeros_like(t[name])
        name = "not finite and nonzero"
    else:
        del t[name]
    save_file(t, str(f), metadata={"format": "pt"})
    code = RUNNER.replace("out, ids_path, res_path = sys.argv[1:4]", "out = sys.argv[1]").split("ids = ")[0]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "GlobeError" in r.stderr, r.stderr[-2000:]
    assert (name if damage != "drop_norm" else "model.norm.weight") in r.stderr.strip().splitlines()[-1]


def test_remote_code_names_a_damaged_globe_section(tiny_dirs, tmp_path):
    """A hand-damaged `globe` section raised a raw KeyError/IndexError inside the generated code; it now
    names the key, as globe.load_model does."""
    model, src = tiny_dirs["qwen2_moe"]
    random_artifacts(model, m=4, r=6, support=2, seed=11).save(tmp_path / "arts")
    out = _export(src, tmp_path / "arts", tmp_path / "g", dtype="fp32")
    conf = json.loads((out / "config.json").read_text())
    conf["globe"]["families"] = "x"
    (out / "config.json").write_text(json.dumps(conf))
    code = RUNNER.replace("out, ids_path, res_path = sys.argv[1:4]", "out = sys.argv[1]").split("ids = ")[0]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "GlobeError" in r.stderr and "globe.families" in r.stderr, r.stderr[-2000:]

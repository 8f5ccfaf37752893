"""Bad input found by this stop's bad-input trial: one line, exit 2 (CLI) or ValueError/GlobeError naming
the problem (Python), nothing left behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import one_line

import globe
from globe.cli.main import main
from globe.errors import GlobeError
from globe.fixtures import FIXTURE_DIR
from globe.testing.artifacts import random_artifacts
from globe.testing.models import save_model, tiny_model


def _src_and_fit(tmp_path):
    """A saved tiny Qwen2-MoE and a fit directory of random artifacts for it."""
    model = tiny_model("qwen2_moe")
    src = save_model(model, tmp_path / "src")
    random_artifacts(model).save(tmp_path / "fit")
    return src, tmp_path / "fit"


@pytest.mark.parametrize("make,key", [
    (lambda: globe.GenerateCfg(prompt="x", max_new_tokens="abc"), "generate.max_new_tokens"),
    (lambda: globe.GenerateCfg(prompt="x", max_new_tokens=2.7), "generate.max_new_tokens"),
    (lambda: globe.GenerateCfg(prompt="x", max_new_tokens=True), "generate.max_new_tokens"),
    (lambda: globe.CacheCfg(S_per_layer="lots"), "cache.S_per_layer"),
    (lambda: globe.EvalCfg(context=None), "eval.context"),
    (lambda: globe.EvalCfg(max_tokens=-5), "eval.max_tokens"),
    (lambda: globe.EvalCfg(dataset="bogus"), "eval.dataset"),
    (lambda: globe.ExportCfg(overwrite="yes"), "export.overwrite"),
])
def test_python_configs_name_the_key(make, key):
    with pytest.raises(ValueError, match=key):
        make()


def test_group_given_a_number(capsys, tmp_path):
    assert "bad override" in one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}",
                                               "bank=5"])


def test_eval_rejects_negative_max_tokens_and_unknown_dataset(capsys):
    assert "eval.max_tokens" in one_line(capsys, ["eval", f"model.path={FIXTURE_DIR}", "eval.max_tokens=-5"])
    assert "eval.dataset" in one_line(capsys, ["eval", f"model.path={FIXTURE_DIR}", "eval.dataset=bogus",
                                               f"eval.text={FIXTURE_DIR / 'eval.txt'}"])


def test_generate_beyond_the_context_is_refused_before_loading(capsys):
    msg = one_line(capsys, ["generate", f"model.path={FIXTURE_DIR}", "prompt=hi", "max_new_tokens=100000000"])
    assert "max_position_embeddings" in msg


@pytest.mark.parametrize("body", [b"\x80\x81\xfe" * 1000, b""])
def test_binary_or_empty_calibration_text_leaves_nothing(body, capsys, tmp_path):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(body)
    out = tmp_path / "fit"
    msg = one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={out}", "train.objective=activation",
                            f"train.calib_text={bad}", "train.steps=2"])
    assert "calibration text" in msg and not out.exists()


def test_corrupt_fit_files(tmp_path, capsys):
    src, fit = _src_and_fit(tmp_path)
    (fit / "summary.json").write_text('"str"')
    assert "summary.json" in one_line(capsys, ["report", str(fit)])
    (fit / "globe_config.json").write_text("[]")
    msg = one_line(capsys, ["export", f"model.path={src}", f"artifacts={fit}", f"output_dir={tmp_path / 'x'}"])
    assert "globe_config.json" in msg and "JSON object" in msg and not (tmp_path / "x").exists()
    with pytest.raises(GlobeError, match="JSON object"):
        globe.Artifacts.load([fit])


def test_export_overwrite_replaces_only_an_earlier_export(tmp_path, capsys):
    src, fit = _src_and_fit(tmp_path)
    out = tmp_path / "out"
    args = ["export", f"model.path={src}", f"artifacts={fit}", f"output_dir={out}", "export.format=dense"]
    assert main(args) == 0
    assert "export.overwrite=true" in one_line(capsys, args)  # refused without the flag, named in the message
    (out / "marker").write_text("x")
    assert main([*args, "export.overwrite=true"]) == 0
    assert not (out / "marker").exists() and json.loads((out / "config.json").read_text())["globe_dense_export"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    msg = one_line(capsys, ["export", f"model.path={src}", f"artifacts={fit}", f"output_dir={other}",
                            "export.overwrite=true"])
    assert "not an earlier globe or dense export" in msg and (other / "notes.txt").read_text() == "mine"
    shutil.rmtree(out)


def test_export_warns_when_the_model_is_not_the_fit_source(tmp_path, capsys, caplog, monkeypatch):
    """Same shapes, other weights: the export works but says so (the fit records a digest of its source)."""
    import logging

    monkeypatch.setattr(logging.getLogger("globe"), "propagate", True)
    caplog.set_level(logging.INFO, logger="globe")
    warned = "differ from those the artifacts were fitted on"
    a = save_model(tiny_model("qwen2_moe", seed=0), tmp_path / "a")
    b = save_model(tiny_model("qwen2_moe", seed=1), tmp_path / "b")
    fit = tmp_path / "fit"
    assert main(["fit", f"model.path={a}", f"output_dir={fit}", "bank.m_up=4", "bank.m_gate=4",
                 "sparsity.target_support=2", "train.steps=2", "train.batch_size=4", "train.baselines=false"]) == 0
    digest = json.loads((fit / "globe_config.json").read_text())["source_digest"]
    assert set(digest) == {"up", "gate"}
    caplog.clear()
    assert main(["export", f"model.path={a}", f"artifacts={fit}", f"output_dir={tmp_path / 'ea'}"]) == 0
    assert not any(warned in r.getMessage() for r in caplog.records)
    assert main(["export", f"model.path={b}", f"artifacts={fit}", f"output_dir={tmp_path / 'eb'}"]) == 0
    assert any(warned in r.getMessage() for r in caplog.records)


def test_api_model_argument_names_the_type_not_the_repr():
    """globe.generate(loaded_model, ...) used to raise with the model's whole multi-line repr."""
    from globe.config import GenerateCfg

    with pytest.raises(ValueError) as e:
        globe.generate(tiny_model("qwen2_moe", seed=0), GenerateCfg(prompt="x"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model: expected a path or hub id") and "Qwen2MoeForCausalLM" in msg
    with pytest.raises(ValueError, match="empty string"):
        globe.generate("", GenerateCfg(prompt="x"))


def test_flags_and_lists_are_checked(capsys):
    """A typo in a flag used to read as true (eval.speed=nope ran the speed test); S_values=abc crashed."""
    from globe.config import CacheCfg, EvalCfg

    assert CacheCfg(enabled="false").mode == "none" and EvalCfg(speed="TRUE").speed is True
    with pytest.raises(ValueError, match="cache.enabled"):
        CacheCfg(enabled="off")
    for bad, key in ((dict(speed="nope"), "eval.speed"), (dict(S_values="abc"), "eval.S_values"),
                     (dict(S_values=["a"]), "eval.S_values[0]"), (dict(S_values=5), "eval.S_values")):
        with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
            EvalCfg(**bad)
    assert EvalCfg(S_values=["4", 8]).S_values == [4, 8]
    msg = one_line(capsys, ["eval", f"model.path={FIXTURE_DIR}", f"eval.text={FIXTURE_DIR / 'eval.txt'}",
                            "eval.speed=nope"])
    assert "eval.speed" in msg and "true or false" in msg


def test_export_with_a_broken_globe_section_is_one_line(tmp_path, capsys):
    src, fit = _src_and_fit(tmp_path)
    out = tmp_path / "out"
    assert main(["export", f"model.path={src}", f"artifacts={fit}", f"output_dir={out}"]) == 0
    conf = json.loads((out / "config.json").read_text())
    for bad in ({"mode": "bogus"}, {"S_per_layer": -3}, None, "x"):
        c = json.loads(json.dumps(conf))
        if bad == "x":
            c["globe"] = "x"
        else:
            c["globe"]["cache"] = bad
        (out / "config.json").write_text(json.dumps(c))
        msg = one_line(capsys, ["eval", f"model.path={out}", "eval.speed=true", "eval.prefill_tokens=4",
                                "eval.decode_tokens=2"])
        assert "config.json" in msg, (bad, msg)


def test_nll_sum_checks_rows_and_shapes():
    from globe.eval.perplexity import nll_sum

    logits, target = torch.randn(12, 5), torch.zeros(12, dtype=torch.long)
    for rows in (0, -1):
        with pytest.raises(ValueError, match="rows"):
            nll_sum(logits, target, rows)
    with pytest.raises(ValueError, match="must agree"):
        nll_sum(logits, target[:10], 5)


@pytest.mark.parametrize("k", [0, 61, -1, "4", True, 2.5])
def test_top_k_outside_one_to_num_experts_is_one_line(k, capsys, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(FIXTURE_DIR, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_experts_per_tok"] = k if k != 61 else cfg["num_experts"] + 1
    (ck / "config.json").write_text(json.dumps(cfg))
    line = one_line(capsys, ["inspect", str(ck)])
    assert "num_experts_per_tok" in line and "expected an integer in [1, " in line

"""Bad input found by this stop's bad-input trial: damaged fit directories and exports (codes, banks,
metadata), config values torch refuses, damaged resume checkpoints, launcher and transformers errors.
Each is one `error:` line and exit 2 (CLI) or a ValueError/GlobeError naming it (Python)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from cli_helpers import edit_config, edit_weights, one_line
from safetensors.torch import load_file, save_file

import globe
from globe.config import ExportCfg
from globe.errors import GlobeError
from globe.fixtures import FIXTURE_DIR

TEXT = FIXTURE_DIR / "eval.txt"


@pytest.fixture
def fit_dir(random_export):
    return random_export[1]


def _edit_fit(src, dst, edit):
    return edit_weights(src, dst, edit, "globe-up.safetensors")


@pytest.mark.parametrize("edit, words", [
    (lambda sd: sd["globe.up.indices"].__setitem__(0, 10 ** 6), "outside [0,"),
    (lambda sd: sd["globe.up.indices"].__setitem__(0, -1), "index -1 outside"),
    (lambda sd: sd.__setitem__("globe.up.indptr", sd["globe.up.indptr"].flip(0)), "not CSR"),
    (lambda sd: sd["globe.up.values"].__setitem__(0, float("nan")), "NaN/inf"),
    (lambda sd: sd["globe.up.bank"].zero_(), "nonzero atoms"),
    (lambda sd: sd.__setitem__("globe.up.A_1", sd["globe.up.A_1"].long()), "expected a floating dtype"),
])
def test_damaged_fit_dir_is_refused(edit, words, capsys, tmp_path, fit_dir):
    """Out-of-range or negative atom ids (an IndexError, or a silent wrap to the last atom), a reversed
    indptr, an all-zero bank (exported and evaluated with exit 0) and integer adapters (cast silently)."""
    d = _edit_fit(fit_dir, tmp_path / "f", edit)
    for argv in (["export", f"model.path={FIXTURE_DIR}", f"artifacts={d}", f"output_dir={tmp_path / 'o'}"],
                 ["eval", f"model.path={FIXTURE_DIR}", f"artifacts={d}", f"eval.text={TEXT}", "eval.max_tokens=64"]):
        line = one_line(capsys, argv)
        assert words in line, (argv[0], line)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit, words", [
    (lambda sd: sd["globe.up.indices"].__setitem__(0, -1), "index -1 outside"),
    (lambda sd: sd["globe.up.bank"].zero_(), "all zeros"),
])
def test_damaged_export_codes_and_bank(edit, words, tmp_path, fit_dir):
    out = globe.export(FIXTURE_DIR, fit_dir, tmp_path / "e", ExportCfg(dtype="fp32"))
    f = next(out.glob("model*.safetensors"))
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(GlobeError, match=words):
        globe.load_model(out)


def test_damaged_globe_config_families(capsys, tmp_path, fit_dir):
    d = tmp_path / "f"
    shutil.copytree(fit_dir, d)
    cfg = json.loads((d / "globe_config.json").read_text())
    cfg["families"] = "x"
    (d / "globe_config.json").write_text(json.dumps(cfg))
    line = one_line(capsys, ["export", f"model.path={FIXTURE_DIR}", f"artifacts={d}", f"output_dir={tmp_path / 'o'}"])
    assert "metadata" in line, line


@pytest.mark.parametrize("summary", ["{bad", json.dumps({"families": [1, 2]}),
                                     json.dumps({"families": {"up": {"rel_fro_error": "abc"}}})])
def test_damaged_summary_fails_export_before_work(summary, capsys, tmp_path, fit_dir):
    d = tmp_path / "f"
    shutil.copytree(fit_dir, d)
    (d / "summary.json").write_text(summary)
    line = one_line(capsys, ["export", f"model.path={FIXTURE_DIR}", f"artifacts={d}", f"output_dir={tmp_path / 'o'}"])
    assert "summary.json" in line, line
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


@pytest.mark.parametrize("key, value", [("keep_fp32", None), ("cache", None)])
def test_export_meta_keep_fp32_and_cache(key, value, capsys, tmp_path, fit_dir):
    out = globe.export(FIXTURE_DIR, fit_dir, tmp_path / "e", ExportCfg(dtype="fp32"))
    conf = json.loads((out / "config.json").read_text())
    conf["globe"][key] = value
    (out / "config.json").write_text(json.dumps(conf))
    line = one_line(capsys, ["eval", f"model.path={out}", f"eval.text={TEXT}", "eval.max_tokens=64"])
    assert f"globe.{key}" in line, line


@pytest.mark.parametrize("override, key", [
    ("train.eps=0", "train.eps"), ("train.eps=-1", "train.eps"), ("train.weight_decay=-1", "train.weight_decay"),
    ("train.seed=100000000000000000000000", "train.seed"), ("bank.seed=100000000000000000000000", "bank.seed"),
    ("sparsity.T_min=1e-300", "sparsity.T_min"), ("sparsity.T_max=1e300", "sparsity.T_min"),
    ("sparsity.eta=1e300", "sparsity.eta"),
])
def test_config_values_torch_refuses(override, key, capsys, tmp_path):
    line = one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}", "train.steps=2",
                             override])
    assert line.startswith(f"error: config {key}:") or line.startswith(f"error: {key}:"), line
    assert not (tmp_path / "o").exists()


def test_damaged_resume_checkpoint(capsys, tmp_path):
    """A resume checkpoint cut short: torch's zip reader error became a one-line error naming the file."""
    argv = ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}", "train.steps=4", "train.eval_every=2",
            "train.checkpoint_every=2", "train.families=[up]", "train.baselines=false"]
    from globe.cli.main import main

    assert main(argv) == 0
    (tmp_path / "o" / "summary.json").unlink()  # as if killed after the checkpoint
    (tmp_path / "o" / "globe-up.safetensors").unlink()
    done = tmp_path / "o" / ".globe_fit" / "up.done.json"
    done.unlink()
    ck = tmp_path / "o" / ".globe_fit" / "up.ckpt.pt"
    with open(ck, "r+b") as f:
        f.truncate(ck.stat().st_size // 2)
    capsys.readouterr()
    line = one_line(capsys, argv)
    assert "resume checkpoint" in line and "up.ckpt.pt" in line and "delete it" in line, line


def test_launch_without_rendezvous(capsys, monkeypatch, tmp_path):
    """RANK and WORLD_SIZE set by hand, MASTER_ADDR not: torch.distributed's ValueError was a traceback."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    line = one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}", "train.steps=2"])
    assert "MASTER_ADDR" in line and "torchrun" in line, line


def test_patch_model_needs_a_transformers_model(fit_dir):
    with pytest.raises(ValueError, match="^model: expected a transformers MoE model"):
        globe.patch_model(torch.nn.Linear(2, 2), fit_dir)


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(vocab_size=5000), "does not match config.json (checkpoint [4096, 128], model [5000, 128])"),
    (lambda c: c.update(num_experts=0), "num_experts=0"),
    (lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] + 3), "config.json: transformers refuses"),
])
def test_config_errors_blame_the_config(edit, words, capsys, tmp_path):
    """A vocab mismatch printed transformers' load-report table before the error; num_experts=0 blamed
    top-k; a layer count transformers refuses blamed the tokenizer."""
    d = edit_config(FIXTURE_DIR, tmp_path / "m", edit)
    rc = globe.cli.main.main(["eval", f"model.path={d}", f"eval.text={TEXT}", "eval.max_tokens=64"])
    cap = capsys.readouterr()
    err = [ln for ln in cap.err.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert rc == 2 and len(err) == 1 and words in err[0], cap.err
    assert "LOAD REPORT" not in cap.out + cap.err


def test_decode_tokens_beyond_the_window(capsys):
    line = one_line(capsys, ["eval", f"model.path={FIXTURE_DIR}", f"eval.text={TEXT}", "eval.max_tokens=64",
                             "eval.speed=true", "eval.prefill_tokens=8", "eval.decode_tokens=1000000000"])
    assert "eval.decode_tokens=1000000000 leaves no room" in line, line


def test_dangling_symlink_output_refused_before_work(capsys, tmp_path, fit_dir):
    link = tmp_path / "out"
    os.symlink(tmp_path / "missing", link)
    line = one_line(capsys, ["export", f"model.path={FIXTURE_DIR}", f"artifacts={fit_dir}", f"output_dir={link}"])
    assert "symbolic link to a missing target" in line, line


def test_eval_of_a_fit_directory_says_so(capsys, fit_dir):
    """It said "nothing to evaluate" (the fit dir has no eval.txt), which blamed the eval settings."""
    line = one_line(capsys, ["eval", f"model.path={fit_dir}"])
    assert "no config.json" in line and "fit directory" in line and f"artifacts={fit_dir}" in line, line


def test_tasks_only_eval_scores_no_perplexity():
    """eval.tasks alone no longer also scores the model directory's eval.txt (minutes on a real model)."""
    from globe.cli.main import compose

    assert compose([f"model.path={FIXTURE_DIR}", "eval.tasks=[x]"]).eval.text is None
    assert compose([f"model.path={FIXTURE_DIR}"]).eval.text == str(FIXTURE_DIR / "eval.txt")


def test_budget_rounding_is_said(caplog, monkeypatch, tmp_path):
    """bank.budget 0.4 with m = 16 on the fixture: r 37 rounds down to 32, keeping 0.342, not 0.4; the
    fit says so (it was silent), and the plan behind the line is the one the fit uses."""
    import logging

    from globe.fit.budget import plan_rank

    pl = plan_rank(64, 88, 128, 16, 8, budget=0.4, multiple=8)
    assert (pl.r, pl.unrounded[0]) == (32, 37) and pl.predicted < 0.9 * 0.4 <= pl.unrounded[1]
    monkeypatch.setattr(logging.getLogger("globe"), "propagate", True)
    caplog.set_level(logging.INFO, logger="globe")
    from globe.cli.main import main

    assert main(["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}", "bank.m_up=16",
                 "sparsity.target_support=8", "train.steps=2", "train.eval_every=1", "train.families=[up]",
                 "train.baselines=false"]) == 0
    said = [r.getMessage() for r in caplog.records if "rounded down" in r.getMessage()]
    assert said == ["fit up: bank.budget=0.4 gives r=37, rounded down to r=32 (a multiple of bank.r_multiple=8), "
                    "which keeps 0.342 of the routed parameters; bank.r_multiple=1 keeps 0.395"], said


def test_wandb_dir_under_a_file(capsys, monkeypatch, tmp_path):
    """WANDB_DIR under a regular file: NotADirectoryError, and the fit's claim was left behind."""
    f = tmp_path / "afile"
    f.write_text("x")
    monkeypatch.setenv("WANDB_DIR", str(f / "wd"))
    line = one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}", "wandb.enabled=true",
                             "train.steps=2"])
    assert line.startswith("error: WANDB_DIR") and "is a file" in line, line
    assert not (tmp_path / "o").exists()


def _sharded(dst, edit):
    """The fixture as a one-shard indexed checkpoint, its index edited."""
    shutil.copytree(FIXTURE_DIR, dst)
    (dst / "model.safetensors").rename(dst / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(dst / "model-00001-of-00001.safetensors"), "pt") as f:
        wm = dict.fromkeys(f.keys(), "model-00001-of-00001.safetensors")
    idx = {"metadata": {}, "weight_map": wm}
    edit(idx)
    (dst / "model.safetensors.index.json").write_text(json.dumps(idx))
    return dst


@pytest.mark.parametrize("edit, words", [
    (lambda idx: idx.pop("weight_map"), 'no "weight_map"'),
    (lambda idx: idx["weight_map"].update({"model.norm.weight": "../../../etc/passwd"}), "outside the model directory"),
    (lambda idx: idx["weight_map"].update({"model.norm.weight": "/etc/passwd"}), "outside the model directory"),
])
def test_index_damage(edit, words, capsys, tmp_path):
    d = _sharded(tmp_path / "m", edit)
    line = one_line(capsys, ["inspect", str(d)])
    assert words in line, line


def test_sharded_copy_is_accepted(tmp_path):
    """The helper above builds a valid checkpoint (else the damage tests could pass on another error)."""
    d = _sharded(tmp_path / "m", lambda idx: None)
    assert globe.inspect(str(d))["num_experts"] == 16


@pytest.mark.parametrize("edit, words", [
    (lambda sd: sd.pop("globe.up.bank"), "lacks tensor globe.up.bank"),
    (lambda sd: sd.__setitem__("globe.up.bank", sd["globe.up.bank"][:, :-1].contiguous()), "globe.up.bank has shape"),
    (lambda sd: sd.pop("globe.gate.A_1"), "lacks tensor globe.gate.A_1"),
])
def test_inspect_checks_family_tensors(edit, words, capsys, tmp_path, fit_dir):
    """inspect printed a damaged export without complaint (eval refuses it): its headers are checked now."""
    out = globe.export(FIXTURE_DIR, fit_dir, tmp_path / "e", ExportCfg(dtype="fp32"))
    assert globe.inspect(str(out))["format"] == "globe"  # the undamaged export passes
    f = next(out.glob("model*.safetensors"))
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})
    line = one_line(capsys, ["inspect", str(out)])
    assert words in line, line


def test_unknown_key_lists_the_section(capsys, tmp_path):
    line = one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}", "bank.m_upp=3"])
    assert "did you mean bank.m_up?" in line and "r_multiple" in line, line
    line = one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}", "bank.foo=3"])
    assert "(bank keys: m_up, m_gate" in line, line


@pytest.mark.parametrize("edit, words", [
    (lambda sd: sd.__setitem__("globe.up.A_1", sd["globe.up.A_1"][..., :-1].contiguous()), "expected [16, 88,"),
    (lambda sd: sd["globe.up.gain"].zero_(), "finite and nonzero"),
    (lambda sd: sd["globe.up.gain"].fill_(float("inf")), "finite and nonzero"),
    (lambda sd: sd["globe.up.gain"].fill_(1e-45), "finite and nonzero"),  # a denormal: every expert ~0
])
@pytest.mark.parametrize("fmt", ["dense", "globe"])
def test_misshaped_adapters_and_zero_gain_are_refused(edit, words, fmt, capsys, tmp_path, fit_dir):
    """Adapters of the wrong rank (the dense export died in a batched matmul with a traceback) and a zero
    gain (every expert silu(0) = 0: both formats exported it with exit 0) are refused in both formats."""
    d = _edit_fit(fit_dir, tmp_path / "f", edit)
    line = one_line(capsys, ["export", f"model.path={FIXTURE_DIR}", f"artifacts={d}",
                             f"output_dir={tmp_path / 'o'}", f"export.format={fmt}"])
    assert words in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["dense", "globe"])
def test_unknown_activation_in_a_fit_dir_is_refused(fmt, capsys, tmp_path, fit_dir):
    """globe_config.json naming an unknown phi: the globe format wrote an export nothing could load."""
    d = tmp_path / "f"
    shutil.copytree(fit_dir, d)
    cfg = json.loads((d / "globe_config.json").read_text())
    cfg["families"]["up"]["activation"] = "foo"
    (d / "globe_config.json").write_text(json.dumps(cfg))
    line = one_line(capsys, ["export", f"model.path={FIXTURE_DIR}", f"artifacts={d}",
                             f"output_dir={tmp_path / 'o'}", f"export.format={fmt}"])
    assert "unknown activation 'foo'" in line, line
    assert not (tmp_path / "o").exists()


def test_zero_gain_in_an_export_is_refused(tmp_path, random_export):
    out = tmp_path / "e"
    shutil.copytree(random_export[0], out)
    f = next(out.glob("model*.safetensors"))
    sd = load_file(str(f))
    sd["globe.up.gain"].zero_()
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(GlobeError, match="finite and nonzero"):
        globe.load_model(out)


def test_config_with_fewer_layers_than_the_weights_is_refused(capsys, tmp_path):
    """config.json saying 2 layers over a 4-layer checkpoint: inspect, fit and eval ran a truncated model
    with exit 0 (transformers drops the extra layers' tensors silently)."""
    def two(c):
        c["num_hidden_layers"] = 2
        if "layer_types" in c:
            c["layer_types"] = c["layer_types"][:2]
    d = edit_config(FIXTURE_DIR, tmp_path / "m", two)
    for argv in (["inspect", str(d)], ["fit", f"model.path={d}", f"output_dir={tmp_path / 'o'}", "train.steps=2"],
                 ["eval", f"model.path={d}", f"eval.text={TEXT}", "eval.max_tokens=64"]):
        line = one_line(capsys, argv)
        assert "decoder layer(s) 2, 3" in line and "num_hidden_layers=2" in line, line
    assert not (tmp_path / "o").exists()


def test_missing_task_paths_without_tasks_is_refused(capsys, tmp_path, random_export):
    """eval.task_paths naming no directory was ignored (exit 0) when no eval.tasks were asked for."""
    line = one_line(capsys, ["eval", f"model.path={random_export[0]}", f"eval.text={TEXT}", "eval.max_tokens=64",
                             f"eval.task_paths=[{tmp_path / 'nowhere'}]", f"output={tmp_path / 'v.json'}"])
    assert "eval.task_paths: no such directory" in line, line
    assert not (tmp_path / "v.json").exists()


def test_export_without_its_globe_section_is_refused(tmp_path, random_export, capsys):
    """load_model fell through to transformers, which printed its interactive trust_remote_code prompt."""
    out = tmp_path / "e"
    shutil.copytree(random_export[0], out)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["globe"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GlobeError, match="no globe section"):
        globe.load_model(out)
    assert "custom code" not in capsys.readouterr().out


def test_demo_with_an_empty_out_is_refused(capsys):
    """`globe demo --out ''` ran the whole demo into a fresh temp directory, as if --out were absent."""
    from globe.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--out needs a directory" in err[0], err


def test_a_directory_as_eval_text_is_named(capsys, tmp_path, random_export):
    line = one_line(capsys, ["eval", f"model.path={random_export[0]}", f"eval.text={tmp_path}"])
    assert "is a directory, not a text file" in line, line

"""Bad input found by the stop-19 bad-input trial: each case is one `error:` line and exit 2 (CLI), or a
GlobeError naming the problem (Python), where it used to be a traceback or a silent wrong result."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import edit_config, edit_weights, one_line
from safetensors.torch import load_file, save_file

import globe
from globe import compat
from globe.cli.main import main
from globe.config import ExportCfg
from globe.errors import GlobeError
from globe.fixtures import FIXTURE_DIR
from globe.io.exportmeta import check_export_meta

TEXT = FIXTURE_DIR / "eval.txt"


@pytest.fixture
def exported(random_export):
    return random_export




def test_missing_attention_weight_is_refused_not_random(capsys, tmp_path):
    """transformers initialises a weight the checkpoint lacks at random and only logs it; eval and generate
    of such an original printed a perplexity (rc 0). Now one line naming the tensor."""
    key = "model.layers.0.self_attn.q_proj.weight"
    d = edit_weights(FIXTURE_DIR, tmp_path / "noq", lambda sd: sd.pop(key))
    for argv in (["eval", f"model.path={d}", f"eval.text={TEXT}", "eval.max_tokens=64"],
                 ["generate", f"model.path={d}", "prompt=hi", "max_new_tokens=2"]):
        line = one_line(capsys, argv)
        assert "q_proj" in line and "missing" in line, line
    with pytest.raises(GlobeError, match="q_proj"):
        globe.load_model(d)


def test_null_top_k_is_refused_on_every_path(capsys, tmp_path, exported):
    """num_experts_per_tok: null raised inside transformers (dense export, eval of a globe export)."""
    def null(c):
        c["num_experts_per_tok"] = None
    orig = edit_config(FIXTURE_DIR, tmp_path / "orig", null)
    exp = edit_config(exported[0], tmp_path / "exp", null)
    for argv in (["eval", f"model.path={orig}", f"eval.text={TEXT}", "eval.max_tokens=64"],
                 ["eval", f"model.path={exp}", f"eval.text={TEXT}", "eval.max_tokens=64"],
                 ["export", f"model.path={orig}", f"artifacts={exported[1]}", f"output_dir={tmp_path / 'o'}",
                  "export.format=dense"]):
        line = one_line(capsys, argv)
        assert "num_experts_per_tok=null" in line, (argv[0], line)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit, key", [
    (lambda g: g.pop("families"), "globe.families"),
    (lambda g: g.update(families="x"), "globe.families"),
    (lambda g: g.update(families={}), "globe.families"),
    (lambda g: g["families"]["up"].update(r=-3), "globe.families.up.r"),
    (lambda g: g["families"]["up"].update(r=10 ** 6), "globe.families.up.r"),
    (lambda g: g["families"]["up"].pop("m"), "globe.families.up.m"),
    (lambda g: g["families"]["up"].update(layer_bank=[5]), "globe.families.up.layer_bank"),
    (lambda g: g.update(moe_layers="0,1"), "globe.moe_layers"),
    (lambda g: g.update(num_experts=True), "globe.num_experts"),
    (lambda g: g.update(dtype="int8"), "globe.dtype"),
])
def test_damaged_globe_section_is_one_line(edit, key, capsys, tmp_path, exported):
    """A hand-edited globe section raised KeyError/TypeError in load_model and inspect."""
    d = edit_config(exported[0], tmp_path / "bad", lambda c: edit(c["globe"]))
    for argv in (["eval", f"model.path={d}", f"eval.text={TEXT}", "eval.max_tokens=64"], ["inspect", str(d)]):
        line = one_line(capsys, argv)
        assert key in line, (argv[0], line)
    with pytest.raises(GlobeError, match=key.replace(".", r"\.")):
        globe.load_model(d)


@pytest.mark.parametrize("edit, key, words", [
    (lambda g: g["families"]["up"].update(activation="relu"), "globe.families.up.activation", "silu"),
    (lambda g: g["families"]["gate"].update(activation=""), "globe.families.gate.activation", "silu"),
    (lambda g: g.setdefault("cache", {}).update(bogus_key=1), "globe.cache", "bogus_key"),
])
def test_unknown_activation_or_cache_key_refused_before_loading(edit, key, words, capsys, tmp_path, exported):
    """An unknown phi was refused only after the model was built (two lines, no file or key); an unknown
    cache key ended in CacheCfg.__init__'s message. Both: one line naming config.json and the key."""
    d = edit_config(exported[0], tmp_path / "bad", lambda c: edit(c["globe"]))
    assert main(["eval", f"model.path={d}", f"eval.text={TEXT}", "eval.max_tokens=64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err  # refused before the load's memory line
    line = err[0]
    assert "config.json" in line and key in line and words in line and "__init__" not in line, line
    with pytest.raises(GlobeError, match=key.replace(".", r"\.")):
        globe.load_model(d)


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_bad_lru_capacity_without_lru_is_one_line(value, capsys, tmp_path):
    """cache.S_per_layer without cache=lru logs a note; for a bad value that note came before the error."""
    rc = main(["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}", "train.steps=2",
               f"cache.S_per_layer={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cache.S_per_layer" in err[0], err


def test_export_meta_checker_accepts_real_exports(exported):
    """The checker must not refuse what export writes (a wrong checker would break every load)."""
    meta = json.loads((exported[0] / "config.json").read_text())["globe"]
    assert check_export_meta(meta, "x") is meta


def test_inspect_string_globe_section(capsys, tmp_path, exported):
    d = edit_config(exported[0], tmp_path / "s", lambda c: c.update(globe="x"))
    assert "format" in one_line(capsys, ["inspect", str(d)])


def test_demo_out_under_a_file(capsys, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    rc = globe.cli.main.main(["demo", "--out", str(f / "sub")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: demo --out") and "is a file" in err[-1], err


@pytest.mark.parametrize("value", ["junk", "-1", "inf", "nan"])
def test_progress_interval_env(value, capsys, monkeypatch):
    """GLOBE_PROGRESS_EVERY_S=junk raised ValueError at import of globe.progress (any verb, even --help)."""
    monkeypatch.setenv("GLOBE_PROGRESS_EVERY_S", value)
    line = one_line(capsys, ["inspect", str(FIXTURE_DIR)])
    assert "GLOBE_PROGRESS_EVERY_S" in line
    monkeypatch.setenv("GLOBE_PROGRESS_EVERY_S", "")  # empty = unset: the default 20 s
    assert globe.progress.env_every_s() == 20.0


@pytest.mark.parametrize("env, key", [({"RANK": "abc", "WORLD_SIZE": "1"}, "RANK"),
                                      ({"RANK": "0", "WORLD_SIZE": "abc"}, "WORLD_SIZE"),
                                      ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3"),
                                      ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK"),
                                      ({"GLOBE_DIST_TIMEOUT_S": "soon"}, "GLOBE_DIST_TIMEOUT_S")])
def test_launcher_env_checked_before_the_fit(env, key, capsys, monkeypatch, tmp_path):
    """RANK=abc let the whole fit run, then crashed printing the summary."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    line = one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}"])
    assert key in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("families", ["x", {"up": 3}, {"up": {"stored_params": "many"}}])
def test_report_on_damaged_summary(families, capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"families": families}))
    (run / "eval.json").write_text(json.dumps({"label": "globe", "perplexity": 3.0}))
    line = one_line(capsys, ["report", str(run)])
    assert "summary.json" in line and "families" in line, line
    assert not (run / "report").exists()


def test_diverged_fit_is_refused(capsys, tmp_path):
    """train.lr=1e30 drove the bank to inf, normalised to an all-zero bank: saved with error 1.0, rc 0."""
    line = one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'o'}", "train.lr=1e30",
                             "train.steps=20", "train.eval_every=10", "train.baselines=false",
                             "train.families=[up]"])
    assert "diverged" in line and "train.lr" in line, line
    assert not (tmp_path / "o").exists() and "was removed" in line  # a directory this run made goes entirely
    (tmp_path / "keep").mkdir()  # an existing output_dir stays, without the diverged run's files
    line = one_line(capsys, ["fit", f"model.path={FIXTURE_DIR}", f"output_dir={tmp_path / 'keep'}", "train.lr=1e30",
                             "train.steps=20", "train.eval_every=10", "train.baselines=false",
                             "train.families=[up]"])
    assert "state was removed" in line and list((tmp_path / "keep").iterdir()) == [], line  # rerunnable there


@pytest.mark.parametrize("fmt", ["globe", "dense"])
def test_export_refuses_non_finite_tensors(fmt, tmp_path, exported):
    """A NaN in a tensor the export copies as it is (here the final norm) was written unchecked."""
    d = edit_weights(FIXTURE_DIR, tmp_path / "nan", lambda sd: sd["model.norm.weight"].__setitem__(0, float("inf")))
    with pytest.raises(GlobeError, match=r"model\.norm\.weight holds 1 NaN/inf"):
        globe.export(d, exported[1], tmp_path / "o", ExportCfg(format=fmt, dtype="fp32"))
    assert not (tmp_path / "o").exists()


def test_export_refuses_values_beyond_fp16(tmp_path, exported):
    """A finite fp32 value above 65504 becomes inf in an fp16 export."""
    d = edit_weights(FIXTURE_DIR, tmp_path / "big", lambda sd: sd["model.norm.weight"].__setitem__(0, 1e6))
    globe.export(d, exported[1], tmp_path / "ok", ExportCfg(dtype="fp32"))  # fp32 holds it
    with pytest.raises(GlobeError, match="fp16"):
        globe.export(d, exported[1], tmp_path / "o", ExportCfg(dtype="fp16"))


def test_num_experts_mismatch_is_one_line_from_headers(capsys, tmp_path):
    """config.json says 20 experts, the weights hold 16: transformers printed its mismatch report first."""
    d = edit_config(FIXTURE_DIR, tmp_path / "ne", lambda c: c.update(num_experts=20))
    rc = globe.cli.main.main(["eval", f"model.path={d}", f"eval.text={TEXT}", "eval.max_tokens=64"])
    cap = capsys.readouterr()
    assert rc == 2 and cap.err.strip().splitlines() == [cap.err.strip().splitlines()[-1]], cap.err
    assert "missing expert tensors" in cap.err and "experts.16." in cap.err and "MISMATCH" not in cap.out + cap.err


@pytest.mark.parametrize("make, key", [
    (lambda: globe.BankCfg(activation=[]), "bank.activation"),
    (lambda: globe.EvalCfg(text=1.5), "eval.text"),
    (lambda: globe.EvalCfg(tasks=[3.0]), "eval.tasks[0]"),
    (lambda: globe.EvalCfg(S_values=[0]), "eval.S_values"),
    (lambda: globe.EvalCfg(decode_tokens=-1), "eval.decode_tokens"),
    (lambda: globe.EvalCfg(prefill_tokens=0), "eval.prefill_tokens"),
    (lambda: globe.TrainCfg(betas=0.9), "train.betas"),
    (lambda: globe.TrainCfg(betas=[0.9, "x"]), "train.betas[1]"),
    (lambda: globe.TrainCfg(calib_tokens=0), "train.calib_tokens"),
])
def test_config_types_named(make, key):
    """These raised TypeError deep inside (or were accepted and failed after the model load)."""
    with pytest.raises(ValueError, match=r"^" + key.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        make()


def test_config_text_fields_take_what_a_user_means(tmp_path):
    """One task name is a list of one (not split into letters); a path or an integer (Hydra reads
    output names like 2024 as numbers) is text."""
    assert globe.EvalCfg(tasks="hellaswag").tasks == ["hellaswag"]
    assert globe.EvalCfg(text=tmp_path / "t.txt").text == str(tmp_path / "t.txt")
    assert globe.EvalCfg(text=5).text == "5"


def test_load_tokenizer_missing_local_path():
    with pytest.raises(GlobeError, match="model path not found: /no/such/dir"):
        globe.load_tokenizer("/no/such/dir")


def test_eval_records_the_lru_capacity_in_use(tmp_path, exported):
    """S_per_layer above the expert count holds every expert: the record says E (16), not 17."""
    from globe.config import CacheCfg, GlobeConfig
    from globe.eval.run import run_eval

    cfg = GlobeConfig.from_dict({"model": {"path": str(exported[0])}, "eval": {"text": str(TEXT), "max_tokens": 64},
                                 "cache": {"mode": "lru", "S_per_layer": 17}})
    assert isinstance(cfg.cache, CacheCfg)
    assert run_eval(cfg)["cache"] == {"mode": "lru", "S_per_layer": 16, "compile": False}


@pytest.mark.parametrize("call, key", [
    (lambda: globe.patch_model(None, "x"), "model"),
    (lambda: globe.patch_model("str", "x"), "model"),
    (lambda: globe.patch_model(compat.load_pretrained(FIXTURE_DIR, torch.float32), "x", cache="full"), "cache"),
    (lambda: globe.export(FIXTURE_DIR, 123, "/nonexistent/out"), "artifacts"),
])
def test_api_arguments_named(call, key):
    with pytest.raises(ValueError, match=f"^{key}: expected"):
        call()


@pytest.mark.parametrize("argv", [["fit2"], ["inspect"], ["inspect", "--jsn", "x"], []])
def test_argparse_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        globe.cli.main.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--help" in err[0], err


def test_nan_weight_is_refused_at_load(capsys, tmp_path, exported):
    """torch's CPU attention turned a NaN in q_proj into finite logits: generate printed text, eval a number.
    Now every loaded weight is checked (originals and globe exports)."""
    key = "model.layers.0.self_attn.q_proj.weight"

    def nan(sd):
        sd[key][0, 0] = float("nan")
    orig = edit_weights(FIXTURE_DIR, tmp_path / "o", nan)
    for argv in (["eval", f"model.path={orig}", f"eval.text={TEXT}", "eval.max_tokens=64"],
                 ["generate", f"model.path={orig}", "prompt=hi", "max_new_tokens=2"]):
        line = one_line(capsys, argv)
        assert key in line and "1 NaN/inf" in line, line
    exp = tmp_path / "e"
    shutil.copytree(exported[0], exp)
    f = next(exp.glob("model*.safetensors"))
    sd = load_file(str(f))
    sd[key][0, 0] = float("inf")
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(GlobeError, match="q_proj.weight holds 1 NaN/inf"):
        globe.load_model(exp)

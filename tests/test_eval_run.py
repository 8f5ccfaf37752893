"""`run_eval` end to end on a saved tiny model with a character tokenizer: exact keys, parity with a
direct perplexity computation, atomic output, bad input before any output."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from globe.config import GlobeConfig
from globe.errors import GlobeError
from globe.eval.perplexity import perplexity, tokenize
from globe.eval.run import KEYS, run_eval
from globe.testing.models import save_model, tiny_model

TEXT = "the quick brown fox jumps over the lazy dog. " * 6


def char_tokenizer(path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(TEXT + "abcdefghijklmnopqrstuvwxyz"))
    vocab = {"<unk>": 0, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    model = tiny_model("qwen2_moe", seed=5)
    d = save_model(model, root / "m")
    char_tokenizer(d)
    (root / "eval.txt").write_text(TEXT)
    return d


def _cfg(model_dir, **ev):
    out = ev.pop("output", None)
    return GlobeConfig.from_dict({"model": {"path": str(model_dir)}, "eval": ev, "output": out,
                                  "cache": {"S_per_layer": 3}})


def test_run_eval_keys_and_parity(model_dir, tmp_path):
    text = model_dir.parent / "eval.txt"
    out_file = tmp_path / "res.json"
    res = run_eval(_cfg(model_dir, text=str(text), context=64, stride=32, speed=True, prefill_tokens=200,
                        decode_tokens=4, hit_rate=True, S_values=[1, 6], device="cpu", dtype="fp32",
                        output=str(out_file)))
    assert set(KEYS) <= set(res)
    assert res["device"] == "cpu" and res["dtype"] == "fp32" and res["model_kind"] == "hf"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tokenize(AutoTokenizer.from_pretrained(str(model_dir)), text.read_text())
    want = perplexity(m, ids, 64, 32)
    assert res["tokens"] == want["tokens"] == len(TEXT) - 1
    assert res["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0 and res["peak_mem_bytes"] > 0
    assert res["prefill_tokens"] == 124 and res["prefill_tokens_clamped_from"] == 200  # 124 + 4 = max positions
    assert set(res["hit_rate_by_S"]) == {"1", "3", "6"}  # cache.S_per_layer is added
    assert res["cache_hit_rate"] == res["hit_rate_by_S"]["3"]
    assert 0 <= res["hit_rate_by_S"]["1"] <= res["cache_hit_rate"] <= res["hit_rate_by_S"]["6"] <= 1
    assert json.loads(out_file.read_text()) == json.loads(json.dumps(res))


def test_run_eval_bad_inputs(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "o.json"
    text = str(model_dir.parent / "eval.txt")
    cases = [
        (dict(text=str(tmp_path / "missing.txt"), output=str(out)), "not found"),
        (dict(text=text, context=200, output=str(out)), "max_position_embeddings"),
        (dict(), "nothing to evaluate"),
        (dict(text=text, output=str(tmp_path / "no" / "dir" / "o.json")), "output directory"),
        (dict(hit_rate=True), "needs text"),
    ]
    for ev, msg in cases:
        with pytest.raises(GlobeError, match=msg):
            run_eval(_cfg(model_dir, **ev))
        assert not out.exists()
    with pytest.raises(GlobeError, match="model path not found"):
        run_eval(_cfg(tmp_path / "nomodel", text=text))
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(GlobeError, match="lm-eval"):
        run_eval(_cfg(model_dir, text=text, tasks=["hellaswag"]))


def test_unknown_lm_eval_task():
    pytest.importorskip("lm_eval")
    from globe.eval.zeroshot import validate_tasks

    with pytest.raises(GlobeError, match="unknown lm-eval task"):
        validate_tasks(["no_such_task_xyz"])


def test_run_eval_on_globe_export_matches_dense_export(tmp_path):
    """A GloBE export and a dense export of the same artifacts give the same perplexity through run_eval."""
    pytest.importorskip("globe.runtime.export")
    from test_eval_report import make_run

    from globe.runtime.export import run_export as export

    run, mdir, _ = make_run(tmp_path)
    char_tokenizer(mdir)
    (tmp_path / "t.txt").write_text(TEXT)
    res = {}
    for fmt in ("globe", "dense"):
        out = export(GlobeConfig.from_dict({"model": {"path": str(mdir)}, "artifacts": str(run),
                                            "output_dir": str(tmp_path / fmt),
                                            "export": {"format": fmt, "dtype": "fp32"}}))
        res[fmt] = run_eval(GlobeConfig.from_dict({
            "model": {"path": str(out)}, "cache": {"mode": "lru", "S_per_layer": 3, "warmup_tokens": 0},
            "eval": {"text": str(tmp_path / "t.txt"), "context": 64, "hit_rate": True, "S_values": [6],
                     "device": "cpu", "dtype": "fp32"}}))
    assert res["globe"]["model_kind"] == "globe" and res["dense"]["model_kind"] == "dense"
    assert res["globe"]["cache"] == {"mode": "lru", "S_per_layer": 3, "compile": False}
    assert res["dense"]["cache"] is None
    assert res["globe"]["perplexity"] == pytest.approx(res["dense"]["perplexity"], rel=1e-4)
    assert res["globe"]["hit_rate_by_S"] == res["dense"]["hit_rate_by_S"]  # same routing
    assert res["globe"]["runtime_cache_stats"]["misses"] > 0
    none = run_eval(GlobeConfig.from_dict({"model": {"path": str(tmp_path / "globe")}, "cache": {"mode": "none"},
                                           "eval": {"text": str(tmp_path / "t.txt"), "context": 64, "device": "cpu",
                                                    "dtype": "fp32", "max_tokens": 65}}))
    assert none["cache"] == {"mode": "none", "S_per_layer": None, "compile": False}  # no S where there is no slab

"""The bundled fixture: a real trained Qwen2-MoE that loads offline and reproduces its perplexity."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from globe.io.inspect import inspect
from globe.testing.models import fixture_info, fixture_path


def _ppl(model, ids: torch.Tensor, ctx: int) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, ids.numel() - 1, ctx):
            x = ids[s : s + ctx + 1]
            if x.numel() < 2:
                break
            lp = torch.log_softmax(model(x[None, :-1]).logits.float()[0], -1)
            nll -= lp.gather(-1, x[1:, None]).sum().item()
            n += x.numel() - 1
    return math.exp(nll / n)


def test_fixture_shape_matches_spec():
    info = inspect(str(fixture_path()))
    assert info["model_type"] == "qwen2_moe"
    assert len(info["moe_layers"]) >= 4 and info["num_experts"] >= 16 and info["top_k"] in (2, 4)
    assert info["shared_expert_intermediate_size"] > 0
    assert 0.6 <= info["expert_intermediate_size"] / info["hidden_size"] <= 0.8
    assert info["bytes_on_disk"] < 20e6


def test_fixture_loads_offline_and_reproduces_perplexity(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = fixture_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.bfloat16
    rec = fixture_info()
    ids = torch.tensor(tok((path / "eval.txt").read_text())["input_ids"])
    assert ids.numel() == rec["eval_tokens"]
    ppl = _ppl(model, ids, rec["context"])
    assert math.isclose(ppl, rec["eval_ppl_bf16"], rel_tol=2e-3), (ppl, rec["eval_ppl_bf16"])
    # A real trained model: far below the unigram perplexity of its training text.
    assert ppl < 0.25 * rec["unigram_ppl"]

"""Perplexity: parity with the model's own loss, the sliding-window scheme, bad input."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from globe.errors import GlobeError
from globe.eval.perplexity import load_dataset_text, load_text, perplexity, windows
from globe.testing.models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2_moe", seed=3)


def _ids(n: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_full_context_equals_model_loss(model):
    ids = _ids(80)
    res = perplexity(model, ids, context=80)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert res["tokens"] == 79
    assert res["windows"] == 1
    assert res["nll_per_token"] == pytest.approx(loss, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_stride_equals_manual_windowed_loss(model):
    ids, ctx, stride = _ids(101, seed=1), 32, 12
    res = perplexity(model, ids, context=ctx, stride=stride)
    # independent loop with the model's own loss: targets [1, ctx+1) first, then `stride` at a time, each
    # window fed the ctx tokens before its targets (plus the last target, whose logit the loss ignores)
    nll, count, first, end = 0.0, 0, 1, ctx + 1
    with torch.no_grad():
        while first < ids.numel():
            begin = max(0, end - 1 - ctx)
            x = ids[begin:end][None]
            labels = x.clone()
            labels[:, : first - begin] = -100
            n_valid = int((labels[:, 1:] != -100).sum())
            assert n_valid == end - first and end - 1 - begin <= ctx
            nll += model(input_ids=x, labels=labels).loss.item() * n_valid
            count += n_valid
            first, end = end, min(end + stride, ids.numel())
    assert res["tokens"] == count == 100
    assert res["nll_sum"] == pytest.approx(nll, rel=1e-5)
    # a shorter history must change the answer (the window really slides)
    assert res["nll_sum"] != pytest.approx(perplexity(model, ids, context=101)["nll_sum"], rel=1e-6)


@pytest.mark.parametrize("n,ctx,stride", [(2, 2, 1), (10, 4, 4), (10, 4, 1), (37, 8, 3), (37, 40, 5), (64, 16, 16)])
def test_windows_score_every_token_once(n, ctx, stride):
    seen = []
    for begin, end, first in windows(n, ctx, stride):
        assert end - 1 - begin <= ctx and begin < first < end  # feeds <= ctx tokens, scores >= 1
        assert first - begin >= min(ctx - stride + 1, first)  # history >= context - stride + 1 tokens
        seen += range(first, end)
    assert seen == list(range(1, n))


def test_bad_inputs(model, tmp_path):
    with pytest.raises(GlobeError, match="not found"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(GlobeError, match="empty"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(GlobeError, match="max_position_embeddings=128"):
        perplexity(model, _ids(20), context=129)
    with pytest.raises(GlobeError, match="stride"):
        perplexity(model, _ids(20), context=8, stride=9)
    with pytest.raises(GlobeError, match="at least 2"):
        perplexity(model, _ids(1), context=8)
    with pytest.raises(GlobeError, match="unknown eval.dataset"):
        load_dataset_text("c4")


def test_wikitext_without_datasets_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(GlobeError, match="datasets") as e:
        load_dataset_text("wikitext2")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_nll_sum_in_row_chunks_equals_one_cross_entropy(n):
    """Chunked fp32 cross-entropy (bounded memory at a 152k vocabulary) equals the one-shot sum."""
    from globe.eval.perplexity import nll_sum

    g = torch.Generator().manual_seed(n)
    logits = (torch.randn(n, 997, generator=g) * 3).to(torch.bfloat16)
    target = torch.randint(0, 997, (n,), generator=g)
    want = torch.nn.functional.cross_entropy(logits.double(), target, reduction="sum").item()
    for rows in (1, 7, 32, 1000):
        assert nll_sum(logits, target, rows) == pytest.approx(want, rel=1e-6)


def test_non_finite_logits_stop_with_the_window_named():
    m = tiny_model("qwen2_moe", seed=3)
    with torch.no_grad():
        m.lm_head.weight[5].fill_(float("nan"))  # every logit row has a NaN in column 5
    with pytest.raises(GlobeError, match=r"not finite .* tokens \[0, 33\) of 80"):
        perplexity(m, _ids(80), context=32)


def test_overflowing_perplexity_is_one_error():
    m = tiny_model("qwen2_moe", seed=3)
    with torch.no_grad():
        m.lm_head.weight.mul_(1e6)  # finite, but the loss is thousands of nats per token
    with pytest.raises(GlobeError, match="overflows"):
        perplexity(m, _ids(80), context=32)

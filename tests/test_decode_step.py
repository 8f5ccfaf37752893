"""compat.decode_step: greedy decoding with the KV cache gives the tokens a full forward gives.

A cache passed under the wrong keyword is silently ignored by some transformers versions: the step then
sees only the new token, and its prediction differs from the full-sequence forward checked here.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from globe import compat
from globe.testing.models import tiny_model


def test_decode_step_matches_full_forward():
    model = tiny_model("qwen2_moe")
    ids = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated keyword on the installed version
        nxt, cache = compat.decode_step(model, ids, None)
        seq = torch.cat([ids, nxt], 1)
        for _ in range(5):
            nxt, cache = compat.decode_step(model, nxt, cache)
            seq = torch.cat([seq, nxt], 1)
        full = model(input_ids=seq[:, :-1]).logits[0, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(full, seq[0, ids.shape[1]:])


def test_keep_last_selects_the_last_positions_as_a_fresh_tensor():
    model = tiny_model("qwen2_moe")
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids).logits  # (1, 9, vocab)
        for n in (1, 4, 9):
            keep = compat.keep_last(n, 9)
            got = model(input_ids=ids, logits_to_keep=keep).logits
            assert got.shape == (1, n, full.shape[-1])
            torch.testing.assert_close(got, full[:, -n:], rtol=1e-5, atol=1e-5)
    assert compat.keep_last(9, 9) == 0  # all positions: nothing sliced
    h = torch.randn(1, 9, 4)  # indexing gives a (1, n, d) tensor of its own (not a view with stride 9 * d)
    assert h[:, compat.keep_last(4, 9), :].stride() == (16, 4, 1)
    assert compat.keep_last(2).tolist() == [-2, -1]  # no length: valid for any sequence of >= 2 positions
    for n, length in ((0, 9), (10, 9), (-1, 3), (0, None)):
        with pytest.raises(ValueError, match="keep_last"):
            compat.keep_last(n, length)


def test_generate_with_keep_last_equals_default_generate():
    model = tiny_model("qwen2_moe")
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)  # transformers' default: logits_to_keep=1 on every step
    got = model.generate(ids, logits_to_keep=compat.keep_last(1), **kw)  # globe generate passes this
    assert got.shape == (1, 12) and torch.equal(got, ref)


def test_lm_head_sees_canonical_strides_and_same_logits():
    model = tiny_model("qwen2_moe").requires_grad_(False)  # as globe.load_model leaves a model
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids, logits_to_keep=3).logits
        compat.canonical_lm_head_input(compat.canonical_lm_head_input(model))  # idempotent: one hook
        seen = []
        model.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].stride()))
        got = model(input_ids=ids, logits_to_keep=3).logits
    d = model.config.hidden_size
    assert seen == [(3 * d, d, 1)]  # not (9 * d, d, 1): transformers' slice re-viewed, no copy
    assert torch.equal(got, ref) and len(model.lm_head._forward_pre_hooks) == 2


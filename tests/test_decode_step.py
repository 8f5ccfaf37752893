"""compat.decode_step: greedy decoding with the KV cache gives the tokens a full forward gives.

A cache passed under the wrong keyword is silently ignored by some transformers versions: the step then
sees only the new token, and its prediction differs from the full-sequence forward checked here.
"""

from __future__ import annotations

import warnings

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



def test_lm_head_sees_canonical_strides_and_same_logits():
    model = tiny_model("qwen2_moe").requires_grad_(False)  # as globe.load_model leaves a model
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = {b: model(input_ids=ids[:b], logits_to_keep=3).logits for b in (1, 2)}
        compat.canonical_lm_head_input(compat.canonical_lm_head_input(model))  # idempotent: one hook
        seen = []
        model.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].stride()))
        got = {b: model(input_ids=ids[:b], logits_to_keep=3).logits for b in (1, 2)}
    d = model.config.hidden_size
    # not (9 * d, d, 1): transformers' slice re-viewed (B = 1, no copy) or copied (B = 2, activations only)
    assert seen == [(3 * d, d, 1), (3 * d, d, 1)]
    # B = 1: the same view, the same bits. B = 2: one GEMM on the copy instead of torch's batched product on
    # the strided view, which may round differently (seen with transformers 5.24: 6e-8 of 0.42)
    assert torch.equal(got[1], ref[1]) and len(model.lm_head._forward_pre_hooks) == 2
    assert float((got[2] - ref[2]).abs().max()) <= 8 * torch.finfo(torch.float32).eps * float(ref[2].abs().max())


def test_generate_with_the_hook_equals_plain_generate():
    model = tiny_model("qwen2_moe").requires_grad_(False)
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)  # transformers' default: logits_to_keep=1 on every step
    got = compat.canonical_lm_head_input(model).generate(ids, **kw)
    assert got.shape == (1, 12) and torch.equal(got, ref)

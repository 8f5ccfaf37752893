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

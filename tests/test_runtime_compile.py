"""cache.compile: the torch.compile'd composition kernel against the float64 reference and the eager kernel;
an expert's bits never depend on the batch; every cache mode agrees bit for bit; a failed compile falls
back to the eager kernel with one log line. Few specialisations on purpose: each compiles (~2-7 s)."""

from __future__ import annotations

import logging

import pytest
import torch
from test_runtime_kernels import make_family, make_layer, ref_tilde, routing, run

import globe.runtime.cache as C
from globe.config import CacheCfg
from globe.runtime import patch_model, unpatch_model
from globe.runtime.cache import SlabCache, compose_many
from globe.runtime.kernels import PATHS, Blocks, experts_forward
from globe.testing.artifacts import random_artifacts
from globe.testing.models import tiny_model

CASES = {  # bank dtype, compute dtype, col_scale, banks
    "fp32": (torch.float32, torch.float32, False),
    "bf16_col_scale": (torch.bfloat16, torch.bfloat16, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_kernel_matches_reference_eager_and_is_batch_independent(case):
    bank_dtype, out_dtype, cs = CASES[case]
    fam = make_family(11, 5, 16, 32, seed=3, col_scale=cs, empty=(4,), dtype=bank_dtype)  # nnz 0..3
    ids = list(range(11))
    eager = compose_many(fam, ids, out_dtype)
    fam.kernel = "compiled"
    fused = compose_many(fam, ids, out_dtype)
    if not C.fused_available():  # no C++ compiler here: the eager kernel ran, nothing fused to test
        pytest.skip("torch.compile cannot compile here")
    ref = torch.stack([ref_tilde(fam, i) for i in ids])
    # the same formula: fp32 accumulation in code order, one cast; the fused pass may contract a*b+c into
    # one rounding (FMA), so the two kernels may differ by one rounding of the compute dtype
    ulp = torch.finfo(out_dtype).eps * ref.abs().max().item()
    assert (fused.double() - ref).abs().max() <= (eager.double() - ref).abs().max() + ulp
    assert (fused.double() - eager.double()).abs().max() <= ulp
    assert torch.equal(fused[4], torch.zeros_like(fused[4]))  # no codes: phi(0) = 0 for silu
    for sub in ([7], [10, 2, 7], [0, 7, 4]):  # any batch, any order: the same bits per expert
        got = compose_many(fam, sub, out_dtype)
        for b, i in enumerate(sub):
            assert torch.equal(got[b], fused[i]), (sub, i)


def test_every_mode_agrees_bit_for_bit_with_the_fused_kernel():
    E = 8
    fams, lw, _, comp = make_layer(E=E)
    for fam in fams.values():
        fam.kernel = "compiled"
    table = torch.empty(E, lw.block_rows, 32)
    comp(list(range(E)), table)
    caches = {S: SlabCache(S, E, (lw.block_rows, 32), torch.float32, "cpu", comp) for S in (0, 1, 3, E)}
    for c, T in enumerate([1, 6, 1, 12, 3]):
        idx, w = routing(T, E, 2, seed=20 + c)
        h = torch.randn(T, 32, generator=torch.Generator().manual_seed(c))
        for path in PATHS:
            want = experts_forward(h, idx, w, lw, Blocks([table]), path)
            for S, cache in caches.items():
                assert torch.equal(run(lw, cache.lookup, h, idx, w, path), want), (c, S, path)


def test_patch_model_with_compile_every_mode_equal_and_close_to_eager():
    model = tiny_model("qwen2_moe")
    arts = random_artifacts(model, m=5, r=8, support=3, seed=1)
    ids = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(0))
    outs = {}
    for mode in ("full", "lru", "none"):
        for comp in (False, True):
            patch_model(model, arts, CacheCfg(mode=mode, S_per_layer=2, warmup_tokens=8, compile=comp))
            assert {model.globe[f].kernel for f in model.globe} == {"compiled" if comp else "eager"}
            with torch.no_grad():
                outs[mode, comp] = model(input_ids=ids).logits
            unpatch_model(model)
    for mode in ("lru", "none"):
        assert torch.equal(outs[mode, True], outs["full", True])
    torch.testing.assert_close(outs["full", True], outs["full", False], rtol=1e-5, atol=1e-5)


def test_a_failed_compile_falls_back_to_the_eager_kernel(monkeypatch, caplog):
    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return call

    monkeypatch.setattr(C, "_fused", {})  # this process's compiled kernels stay as they were
    monkeypatch.setattr(torch, "compile", broken)
    fam = make_family(6, 4, 8, 16, seed=5)
    want = compose_many(fam, list(range(6)), torch.float32)
    fam.kernel = "compiled"
    with caplog.at_level(logging.WARNING, logger="globe"):
        got = compose_many(fam, list(range(6)), torch.float32)
        again = compose_many(fam, [2], torch.float32)
    assert torch.equal(got, want) and torch.equal(again[0], want[2])
    msgs = [r.getMessage() for r in caplog.records if "cache.compile" in r.getMessage()]
    assert len(msgs) == 1 and "RuntimeError: no C++ compiler found" in msgs[0] and "more detail" not in msgs[0]

"""Patched model == dense-reconstructed model, all cache modes agree, unpatch is exact, bad input errors."""

from __future__ import annotations

import copy

import pytest
import torch

from globe import compat
from globe.config import CacheCfg
from globe.errors import GlobeError
from globe.runtime import GloBEExperts, cache_stats, patch_model, to_dense_model, unpatch_model
from globe.testing.artifacts import dense_reference, random_artifacts
from globe.testing.models import TINY, fixture_path, tiny_model

IDS = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model, ids=IDS):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("mt", list(TINY))
def test_patched_equals_dense_reconstruction_every_arch(mt):
    model = tiny_model(mt)
    arts = random_artifacts(model, m=5, r=8, support=3, seed=1)
    ref = _logits(dense_reference(copy.deepcopy(model), arts))
    orig = _logits(model)
    outs = {}
    for mode in ("full", "lru", "none"):
        patch_model(model, arts, CacheCfg(mode=mode, S_per_layer=2, warmup_tokens=16))
        assert all(isinstance(compat.get_experts(model, L), GloBEExperts) for L in compat.moe_layer_ids(model))
        outs[mode] = _logits(model)
        unpatch_model(model)
        assert torch.equal(_logits(model), orig)  # originals back, bit-exact
    torch.testing.assert_close(outs["full"], ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(orig, ref, atol=1e-3)  # the artifacts really changed the model
    assert torch.equal(outs["lru"], outs["full"]) and torch.equal(outs["none"], outs["full"])


def test_partial_family_compose_full_and_to_dense():
    model = tiny_model("qwen2_moe")
    arts = random_artifacts(model, families=("up",), m=4, r=6, col_scale=True, seed=2)
    ref = _logits(dense_reference(copy.deepcopy(model), arts))
    patch_model(model, arts, CacheCfg(compose_full=True))
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)
    unpatch_model(model)
    patch_model(model, arts, keep_original=False)
    got = _logits(model)
    unpatch_model(model)  # no originals kept: rebuilt from W_hat
    assert type(compat.get_experts(model, 0)).__name__ == "Qwen2MoeExperts"
    torch.testing.assert_close(_logits(model), got, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_decode_with_kv_cache_matches_dense():
    model = tiny_model("qwen3_moe")
    arts = random_artifacts(model, m=6, r=8, seed=3)
    ref_model = dense_reference(copy.deepcopy(model), arts)
    patch_model(model, arts, CacheCfg(mode="lru", S_per_layer=3, warmup_tokens=0), collect_stats=True)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    a = model.generate(IDS[:1], **kw)
    b = ref_model.generate(IDS[:1], **kw)
    assert torch.equal(a, b)
    st = cache_stats(model)
    assert st["misses"] > 0 and st["hits"] + st["misses"] > 0
    assert all(v["cached"] <= 3 for v in st["layers"].values())


def test_bf16_model_patches_in_its_dtype():
    model = tiny_model("olmoe", dtype=torch.bfloat16)
    arts = random_artifacts(model, m=4, r=8)
    patch_model(model, arts)
    mod = compat.get_experts(model, 0)
    assert mod.A("up").dtype == torch.bfloat16 and mod.table.dtype == torch.bfloat16
    assert _logits(model).dtype == torch.bfloat16
    ref = _logits(to_dense_model(copy.deepcopy(model)))  # same weights, one dense GEMM per family
    torch.testing.assert_close(_logits(model).float(), ref.float(), rtol=0.05, atol=0.05)


def test_fixture_patched_equals_dense_reconstruction():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fixture_path()), dtype=torch.float32).eval()
    arts = random_artifacts(model, m=8, r=44, support=4, seed=4)
    ids = torch.randint(3, 4000, (1, 48), generator=torch.Generator().manual_seed(5))
    ref = _logits(dense_reference(copy.deepcopy(model), arts), ids)
    for mode in ("full", "lru", "none"):
        patch_model(model, arts, CacheCfg(mode=mode, S_per_layer=5, warmup_tokens=32))
        torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)
        unpatch_model(model)


def _bad(model, **kw):
    arts = random_artifacts(model, m=4, r=4)
    for k, v in kw.items():
        setattr(arts, k, v)
    return arts


@pytest.mark.parametrize("change,msg", [
    (dict(model_type="mixtral"), "model_type"),
    (dict(moe_layers=[0]), "MoE layers"),
    (dict(num_experts=5), "experts per layer"),
    (dict(hidden_size=16), "expert shape"),
])
def test_mismatched_artifacts_raise_one_line(change, msg):
    model = tiny_model("qwen2_moe")
    with pytest.raises(GlobeError, match=msg) as ei:
        patch_model(model, _bad(model, **change))
    assert "\n" not in str(ei.value)
    assert not hasattr(model, "_globe") or model._globe is None  # nothing swapped


def test_double_patch_and_unpatch_plain_raise():
    model = tiny_model("qwen2_moe")
    with pytest.raises(GlobeError, match="not patched"):
        unpatch_model(model)
    arts = random_artifacts(model, m=4, r=4)
    patch_model(model, arts)
    with pytest.raises(GlobeError, match="already patched"):
        patch_model(model, arts)


def test_missing_artifacts_dir_raises(tmp_path):
    with pytest.raises(GlobeError, match="artifacts directory not found"):
        patch_model(tiny_model("qwen2_moe"), tmp_path / "nope")

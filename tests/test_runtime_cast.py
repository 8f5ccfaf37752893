"""A patched model follows .to(dtype), .half(), .float(), .bfloat16() like any nn.Module, in every cache mode."""

from __future__ import annotations

import copy

import pytest
import torch

from globe.config import CacheCfg
from globe.runtime import patch_model
from globe.runtime.patch import globe_layers
from globe.testing.artifacts import dense_reference, random_artifacts
from globe.testing.models import tiny_model

IDS = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(m):
    return m(input_ids=IDS).logits


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("qwen2_moe")
    arts = random_artifacts(model, m=5, r=8, support=3, seed=1, banks=2)
    return model, arts


@pytest.mark.parametrize("cast", ["to_bf16", "half", "bfloat16"])
def test_cast_after_patch_every_mode(setup, cast):
    model, arts = setup
    want_dt = torch.float16 if cast == "half" else torch.bfloat16
    ref = _logits(dense_reference(copy.deepcopy(model), arts).to(want_dt)).float()
    outs = {}
    for mode in ("full", "lru", "none"):
        m = patch_model(copy.deepcopy(model), arts, CacheCfg(mode=mode, S_per_layer=2, warmup_tokens=0))
        _logits(m)  # fill the LRU in fp32 first: those blocks must not survive the cast
        m = m.to(want_dt) if cast == "to_bf16" else getattr(m, cast)()
        for mod in globe_layers(m).values():
            assert mod.compute_dtype == want_dt and mod.down_proj.dtype == want_dt
            assert mod.slab is None or mod.slab.dtype == want_dt
            if mode == "full":
                assert mod.table.dtype == want_dt
        st = m.globe["up"]
        assert st.values.dtype == torch.float32 and st.gain.dtype == torch.float32  # codes never narrowed
        assert st.bank.dtype == torch.float32 or st.released
        out = _logits(m)
        assert out.dtype == want_dt
        outs[mode] = out.float()
    assert torch.equal(outs["full"], outs["lru"]) and torch.equal(outs["full"], outs["none"])
    tol = 3e-2 if want_dt == torch.bfloat16 else 5e-3
    torch.testing.assert_close(outs["full"], ref, rtol=tol, atol=tol)


def test_float_roundtrip_and_state_dict_names(setup):
    model, arts = setup
    m = patch_model(copy.deepcopy(model), arts, CacheCfg(mode="lru", S_per_layer=2, warmup_tokens=0))
    before = _logits(m)
    back = m.half().float()
    torch.testing.assert_close(_logits(back), before, rtol=2e-2, atol=2e-2)
    names = set(m.state_dict())
    assert {"globe.up.bank", "globe.up.indptr", "globe.up.values", "globe.gate.A_0"} <= names
    assert "model.layers.0.mlp.experts.down_proj" in names
    assert not any(n.endswith(".table") for n in names)  # caches are not part of the weights

"""The common tester: one pipeline run on every registry architecture and every sparse map / activation.

Why: fit, export and load are where architectures differ (names, dense layers, shared experts) and
where a new sparse map or phi must reach the runtime, so each case runs the whole chain on a tiny model
(globe.testing.models.TINY), peft-style:

    short fit (globe.compress) -> fit dir saved -> patch_model on a fresh copy == dense model carrying W_hat
    -> export globe (fp32) -> globe.load_model == patched model, bit for bit
    -> export dense (fp32) -> plain transformers from_pretrained == patched model (fp32 tolerance)
    -> unpatch_model restores every original weight and the original logits bit for bit.

Cases: every architecture of globe.registry.REGISTRY with the default map and phi, and every other
sparse map (globe.maps.SPARSE_MAPS) and activation (globe.maps.ACTIVATIONS) on qwen2_moe, so adding an
architecture (one registry entry + one TINY entry) or a map/phi (one globe.maps entry) adds its case here;
one tied-embedding case covers exports that share the lm_head with the embedding.
"""

from __future__ import annotations

import copy

import pytest
import torch

import globe
from globe import compat
from globe.api import FitCfg
from globe.artifacts import Artifacts
from globe.config import BankCfg, ExportCfg, SparsityCfg, TrainCfg
from globe.maps import ACTIVATIONS, SPARSE_MAPS
from globe.registry import REGISTRY
from globe.testing.artifacts import dense_reference
from globe.testing.models import TINY, save_model, tiny_model

MAP, ACT = SparsityCfg().map, BankCfg().activation
CASES = ([(mt, MAP, ACT, "") for mt in sorted(REGISTRY)]
         + [("qwen2_moe", mp, ACT, "") for mp in sorted(SPARSE_MAPS) if mp != MAP]
         + [("qwen2_moe", MAP, act, "") for act in sorted(ACTIVATIONS) if act != ACT]
         + [("qwen3_moe", MAP, ACT, "tied")])  # tie_word_embeddings: one lm_head/embedding tensor on export
IDS = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


def test_every_registry_architecture_has_a_tiny_model():
    assert set(TINY) == set(REGISTRY)


@pytest.mark.parametrize("mt,sparse_map,activation,variant", CASES, ids=["-".join(filter(None, c)) for c in CASES])
def test_fit_patch_export_load_unpatch(tmp_path, mt, sparse_map, activation, variant):
    src = save_model(tiny_model(mt, seed=3, tie_word_embeddings=variant == "tied"), tmp_path / "src")
    fit_dir = tmp_path / "fit"
    globe.compress(src, fit_dir, FitCfg(bank=BankCfg(m_up=4, m_gate=4, r=6, activation=activation),
                                        sparsity=SparsityCfg(map=sparse_map, target_support=2),
                                        train=TrainCfg(steps=4, batch_size=8, eval_every=2, device="cpu",
                                                       baselines=False)), progress=False)
    arts = Artifacts.load(fit_dir)
    fam = arts.families["up"]
    assert fam.activation == activation and fam.meta["map"] == sparse_map
    assert int((fam.codes > 0).sum(1).min()) >= 1

    model = compat.load_pretrained(src, torch.float32).eval()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (variant == "tied")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    orig = _logits(model)
    ref = _logits(dense_reference(copy.deepcopy(model), arts))
    globe.patch_model(model, fit_dir)
    patched = _logits(model)
    torch.testing.assert_close(patched, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(patched, orig, atol=1e-3)  # the fit really replaced the experts

    g = globe.export(src, fit_dir, tmp_path / "globe", ExportCfg(format="globe", dtype="fp32"))
    assert torch.equal(_logits(globe.load_model(g)), patched)

    from transformers import AutoModelForCausalLM

    d = globe.export(src, fit_dir, tmp_path / "dense", ExportCfg(format="dense", dtype="fp32"))
    plain = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(plain), patched, rtol=1e-5, atol=1e-5)

    globe.unpatch_model(model)
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    assert torch.equal(_logits(model), orig)

"""Registry + reader: every architecture, both layouts, counts equal transformers' own parameters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from globe.errors import GlobeError
from globe.io.checkpoint import Checkpoint
from globe.io.inspect import inspect
from globe.models import TINY
from globe.registry import REGISTRY, get_spec, moe_layers


def test_registry_covers_tiny_models():
    assert set(TINY) == set(REGISTRY)


def _block(model, spec, layer):
    return getattr(model.model.layers[layer], spec.block)


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_moe_layers_match_transformers(tiny_dirs, model_type):
    model, path = tiny_dirs[model_type]
    ck = Checkpoint(path)
    spec = get_spec(model_type)
    expected = [i for i, layer in enumerate(model.model.layers)
                if hasattr(getattr(layer, spec.block), "experts")]
    assert ck.moe_layers == expected
    assert len(expected) >= 1


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_experts_equal_in_memory_weights(tiny_dirs, model_type):
    model, path = tiny_dirs[model_type]
    ck = Checkpoint(path)
    p = ck.p
    for L in ck.moe_layers:
        ex = _block(model, ck.spec, L).experts
        for e in range(ck.num_experts):
            assert torch.equal(ck.expert(L, e, "gate"), ex.gate_up_proj[e, :p])
            assert torch.equal(ck.expert(L, e, "up"), ex.gate_up_proj[e, p:])
            assert torch.equal(ck.expert(L, e, "down"), ex.down_proj[e])
    up = ck.load_family("up")
    assert up.shape == (len(ck.moe_layers) * ck.num_experts, p, ck.hidden_size)
    L1 = ck.moe_layers[-1]
    assert torch.equal(up[(len(ck.moe_layers) - 1) * ck.num_experts + 1], ck.expert(L1, 1, "up"))


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_inspect_counts_match_model(tiny_dirs, model_type):
    model, path = tiny_dirs[model_type]
    info = inspect(str(path))
    spec = get_spec(model_type)
    p = info["expert_intermediate_size"]
    up = gate = down = shared = 0
    for L in info["moe_layers"]:
        blk = _block(model, spec, L)
        gate += blk.experts.gate_up_proj[:, :p].numel()
        up += blk.experts.gate_up_proj[:, p:].numel()
        down += blk.experts.down_proj.numel()
        for name in (spec.shared, spec.shared_gate):
            if name:
                shared += sum(t.numel() for t in getattr(blk, name).parameters())
    assert info["params"] == {
        "routed_up": up, "routed_gate": gate, "routed_down": down, "shared": shared,
        "total": sum(v.numel() for v in model.state_dict().values()),
    }
    assert info["num_experts"] == model.model.layers[info["moe_layers"][0]].mlp.experts.gate_up_proj.shape[0]
    assert info["hidden_size"] == model.config.hidden_size
    assert (info["shared_expert_intermediate_size"] > 0) == bool(spec.shared)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_fused_layout_reads_same_experts(tiny_dirs, tmp_path, model_type):
    model, path = tiny_dirs[model_type]
    # Write the in-memory (transformers-5 fused) state dict straight to safetensors.
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    fused, per = Checkpoint(tmp_path), Checkpoint(path)
    assert fused.layout == "fused" and per.layout == "per_expert"
    for fam in ("gate", "up", "down"):
        assert torch.equal(fused.load_family(fam), per.load_family(fam))
    assert inspect(str(tmp_path))["params"] == inspect(str(path))["params"]


def test_sharded_index_and_bf16(tmp_path):
    from globe.models import save_model, tiny_model

    m = tiny_model("qwen2_moe", dtype=torch.bfloat16)
    m.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ck = Checkpoint(tmp_path)
    assert len(ck.files) > 1
    w = ck.expert(ck.moe_layers[-1], 3, "up")
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, m.model.layers[ck.moe_layers[-1]].mlp.experts.gate_up_proj[3, ck.p:])
    del save_model


def test_moe_layer_rules():
    q = get_spec("qwen2_moe")
    assert moe_layers(q, {"num_hidden_layers": 6, "num_experts": 4, "decoder_sparse_step": 2,
                          "mlp_only_layers": [3]}) == [1, 5]
    ds = get_spec("deepseek_v2")
    assert moe_layers(ds, {"num_hidden_layers": 5, "n_routed_experts": 4, "first_k_dense_replace": 2,
                           "moe_layer_freq": 1}) == [2, 3, 4]
    assert moe_layers(q, {"num_hidden_layers": 4, "num_experts": 0}) == []


def test_reference_config_is_qwen2_moe():
    from pathlib import Path

    ref = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qwen1.5-moe-a2.7b-config.json"
    if not ref.is_file():
        pytest.skip("shared/reference not beside this checkout")
    cfg = json.loads(ref.read_text())
    spec = get_spec(cfg["model_type"])
    assert moe_layers(spec, cfg) == list(range(24))
    from globe.models import QWEN15_MOE_A27B

    for k, v in QWEN15_MOE_A27B.items():
        if k in cfg and k not in ("rope_theta",):
            assert cfg[k] == v, k


def test_unknown_model_type_says_how_to_add():
    with pytest.raises(GlobeError, match="ArchSpec entry in globe/registry.py"):
        get_spec("my_new_moe")


@pytest.mark.slow
def test_inspect_real_dimension_model(tmp_path):
    from globe.models import real_dim_model

    model = real_dim_model(num_layers=1, vocab_size=256, random=False)
    model.save_pretrained(tmp_path)
    info = inspect(str(tmp_path))
    ex = model.model.layers[0].mlp.experts
    assert (info["num_experts"], info["expert_intermediate_size"], info["hidden_size"]) == (60, 1408, 2048)
    assert info["shared_expert_intermediate_size"] == 5632 and info["top_k"] == 4
    assert info["params"]["routed_up"] == ex.gate_up_proj.numel() // 2 == 60 * 1408 * 2048
    assert info["params"]["routed_down"] == ex.down_proj.numel()
    blk = model.model.layers[0].mlp
    assert info["params"]["shared"] == sum(p.numel() for m in (blk.shared_expert, blk.shared_expert_gate)
                                           for p in m.parameters())
    assert info["params"]["total"] == sum(v.numel() for v in model.state_dict().values())
    assert info["dtypes"] == {"BF16": info["params"]["total"]}

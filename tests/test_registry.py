"""Registry + reader: every architecture, both layouts, counts equal transformers' own parameters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from globe.errors import GlobeError
from globe.io.checkpoint import Checkpoint
from globe.io.inspect import inspect
from globe.registry import REGISTRY, get_spec, moe_layers, num_experts
from globe.testing.models import TINY


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
    from globe.testing.models import save_model, tiny_model

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
    # Issue 9: transformers' DeepseekV2 ignores moe_layer_freq: first_k_dense_replace=1, 4 layers -> 1, 2, 3.
    assert moe_layers(ds, {"num_hidden_layers": 4, "n_routed_experts": 4, "first_k_dense_replace": 1,
                           "moe_layer_freq": 2}) == [1, 2, 3]
    assert moe_layers(q, {"num_hidden_layers": 4, "num_experts": 0}) == []
    with pytest.raises(GlobeError, match="decoder_sparse_step must be >= 1"):
        moe_layers(q, {"num_hidden_layers": 4, "num_experts": 4, "decoder_sparse_step": 0})
    with pytest.raises(GlobeError, match="first_k_dense_replace must be an integer"):
        moe_layers(ds, {"num_hidden_layers": 4, "n_routed_experts": 4, "first_k_dense_replace": None})


# ---- the layer rule against the installed transformers classes and the files they write ----------
LAYER_FIELDS = {
    "decoder_sparse_step": [1, 2, 3], "mlp_only_layers": [[], [0], [1, 3]],
    "first_k_dense_replace": [0, 1, 2, 3], "moe_layer_freq": [1, 2],
}
OWN_FIELDS = {"sparse_step": ("decoder_sparse_step", "mlp_only_layers"),
              "first_k_dense": ("first_k_dense_replace", "moe_layer_freq"), "all": ()}


def _grid(fields):
    import itertools

    keys = list(fields)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(LAYER_FIELDS[k] for k in keys))]


def _class_moe_layers(model_type, raw):
    """MoE layers of the installed transformers class built on meta from a config.json dict."""
    from globe.testing.models import _classes

    cfg_cls, model_cls, _ = _classes(model_type)
    cfg = cfg_cls(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version",
                                                              "architectures")})
    with torch.device("meta"):
        model = model_cls(cfg)
    blocks = [getattr(layer, get_spec(model_type).block) for layer in model.model.layers]
    E = [b.experts.gate_up_proj.shape[0] for b in blocks if hasattr(b, "experts")]
    return [i for i, b in enumerate(blocks) if hasattr(b, "experts")], (E[0] if E else 0)


def _config_json(model_type, **fields):
    """The config.json save_pretrained writes for a 4-layer tiny model with these fields."""
    from globe.testing.models import _COMMON, _classes

    cfg_cls, _, extra = _classes(model_type)
    kw = {**_COMMON, **extra, "num_hidden_layers": 4, "mlp_only_layers": []}
    kw = {k: v for k, v in kw.items() if k != "mlp_only_layers" or get_spec(model_type).layer_rule == "sparse_step"}
    return json.loads(cfg_cls(**{**kw, **fields}).to_json_string(use_diff=True))


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_layer_rule_equals_transformers_class(model_type):
    """registry.moe_layers == where the installed class builds an MoE block, over every layer field
    (a class ignores the fields of other rules), and with the rule's keys left out of config.json."""
    spec = get_spec(model_type)
    n = 0
    for fields in _grid(LAYER_FIELDS):
        raw = _config_json(model_type, **fields)
        layers, _ = _class_moe_layers(model_type, raw)
        assert moe_layers(spec, raw) == layers, (fields, layers)
        n += 1
        for key in OWN_FIELDS[spec.layer_rule]:  # an omitted key takes the class default
            if key in raw and key != "moe_layer_freq":  # (not a transformers attribute: no default)
                less = {k: v for k, v in raw.items() if k != key}
                assert moe_layers(spec, less) == _class_moe_layers(model_type, less)[0], (key, fields)
    assert n == 72


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_expert_count_keys_and_defaults_equal_transformers(model_type):
    from globe.testing.models import _classes

    spec = get_spec(model_type)
    cfg_cls = _classes(model_type)[0]
    for key, val in spec.defaults.items():
        assert getattr(cfg_cls(), key) == val, key
    raw = _config_json(model_type)
    keys = (spec.num_experts_key,) if isinstance(spec.num_experts_key, str) else spec.num_experts_key
    base = {k: v for k, v in raw.items() if k not in keys}
    for key in keys:  # the attribute and each alias alone
        one = {**base, key: 5}
        assert num_experts(spec, one) == _class_moe_layers(model_type, one)[1] == 5, key
    assert num_experts(spec, base) == _class_moe_layers(model_type, base)[1] == spec.defaults[keys[0]]
    if len(keys) > 1:
        with pytest.raises(GlobeError, match="disagree"):
            num_experts(spec, {**base, keys[0]: 5, keys[1]: 6})


def _disk_moe_layers(path):
    import re

    names = load_file(str(path / "model.safetensors")).keys()
    return sorted({int(m.group(1)) for k in names if (m := re.match(r"model\.layers\.(\d+)\.\w+\.experts\.", k))})


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_layer_rule_equals_files_on_disk(model_type, tmp_path):
    """globe's MoE layers == the class's == the layers save_pretrained writes experts for."""
    spec = get_spec(model_type)
    for i, fields in enumerate(_grid({k: LAYER_FIELDS[k] for k in OWN_FIELDS[spec.layer_rule]})):
        from globe.testing.models import tiny_model

        kw = {"num_hidden_layers": 4, **fields}
        if spec.layer_rule == "sparse_step":
            kw.setdefault("mlp_only_layers", [])
        model = tiny_model(model_type, **kw)
        d = tmp_path / str(i)
        model.save_pretrained(d)
        want = [j for j, layer in enumerate(model.model.layers) if hasattr(getattr(layer, spec.block), "experts")]
        assert _disk_moe_layers(d) == want, fields
        if not want:
            with pytest.raises(GlobeError, match="no MoE layers"):
                Checkpoint(d)
            continue
        ck = Checkpoint(d)
        assert ck.moe_layers == want == moe_layers(spec, json.loads((d / "config.json").read_text())), fields
        assert inspect(str(d))["moe_layers"] == want


def test_issue_deepseek_v2_layer_freq(tmp_path, capsys):
    """Issue 9, kind 2: DeepSeek-V2, first_k_dense_replace=1, moe_layer_freq=2, 4 layers."""
    from globe.cli.main import main
    from globe.testing.models import tiny_model

    m = tiny_model("deepseek_v2", num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=2)
    m.save_pretrained(tmp_path / "tf")
    assert main(["inspect", "--json", str(tmp_path / "tf")]) == 0
    assert json.loads(capsys.readouterr().out)["moe_layers"] == [1, 2, 3]
    fit = tmp_path / "fit"  # the fit (and so the export) covers every MoE layer
    assert main(["fit", f"model.path={tmp_path / 'tf'}", f"output_dir={fit}", "bank.m_up=2", "bank.m_gate=2",
                 "bank.r=4", "sparsity.target_support=1", "train.steps=2", "train.baselines=false"]) == 0
    assert json.loads((fit / "globe_config.json").read_text())["moe_layers"] == [1, 2, 3]
    capsys.readouterr()
    # The same config with files as DeepSeek's remote code writes them (experts only where L % 2 == 0):
    # transformers would build experts in layers 1 and 3 with nothing to load -> refused.
    d = tmp_path / "remote"
    shutil.copytree(tmp_path / "tf", d)
    sd = load_file(str(d / "model.safetensors"))
    inter, hid = m.config.intermediate_size, m.config.hidden_size
    for L in (1, 3):
        for k in [k for k in sd if k.startswith(f"model.layers.{L}.mlp.")]:
            del sd[k]
        sd[f"model.layers.{L}.mlp.gate_proj.weight"] = torch.zeros(inter, hid)
        sd[f"model.layers.{L}.mlp.up_proj.weight"] = torch.zeros(inter, hid)
        sd[f"model.layers.{L}.mlp.down_proj.weight"] = torch.zeros(hid, inter)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert "layer 1 has no expert tensors on disk" in err and "moe_layer_freq=2 is ignored" in err
    assert "\n" not in err


@pytest.mark.parametrize("model_type,field,val,layer", [
    ("deepseek_v2", "first_k_dense_replace", 2, 1), ("qwen2_moe", "decoder_sparse_step", 2, 0),
    ("qwen3_moe", "mlp_only_layers", [0, 2], 2)])
def test_experts_where_config_says_dense(tiny_dirs, tmp_path, capsys, model_type, field, val, layer):
    from globe.cli.main import main

    d = shutil.copytree(tiny_dirs[model_type][1], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = val
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"layer {layer} holds expert tensors" in err and "dense layer" in err and field in err, err


def test_reference_config_is_qwen2_moe():
    from pathlib import Path

    ref = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qwen1.5-moe-a2.7b-config.json"
    if not ref.is_file():
        pytest.skip("shared/reference not beside this checkout")
    cfg = json.loads(ref.read_text())
    spec = get_spec(cfg["model_type"])
    assert moe_layers(spec, cfg) == list(range(24))
    from globe.testing.models import QWEN15_MOE_A27B

    for k, v in QWEN15_MOE_A27B.items():
        if k in cfg and k not in ("rope_theta",):
            assert cfg[k] == v, k


def test_unknown_model_type_says_how_to_add():
    with pytest.raises(GlobeError, match="ArchSpec entry in globe/registry.py"):
        get_spec("my_new_moe")


@pytest.mark.slow
def test_inspect_real_dimension_model(tmp_path):
    from globe.testing.models import real_dim_model

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

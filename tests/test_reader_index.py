"""Index vs shards, and config.json vs the tensors: every disagreement is refused by the first command.

Issue 9: an index and its shards may disagree in any direction (named in the index but absent from
its shard, present in a shard but absent from the index, stored twice); a config.json whose expert
count, width or hidden size disagrees with the tensors was accepted by inspect and fit.
"""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from globe.cli.main import main
from globe.errors import GlobeError
from globe.io.checkpoint import INDEX, Checkpoint
from globe.testing.models import tiny_model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded") / "m"
    tiny_model("qwen2_moe").save_pretrained(d, max_shard_size="40KB")
    idx = json.loads((d / INDEX).read_text())["weight_map"]
    assert len(set(idx.values())) >= 3
    return d


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "m")


def _index(d):
    return json.loads((d / INDEX).read_text())


def _rewrite(path, edit):
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def _refused(capsys, d, *needles):
    with pytest.raises(GlobeError) as ei:
        Checkpoint(d)
    msg = str(ei.value)
    rc = main(["inspect", str(d)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: {msg}" and "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_sharded_reads(sharded):
    ck = Checkpoint(sharded)
    assert len(ck.files) >= 3 and ck.layout == "per_expert"


def test_named_in_index_absent_from_shard(sharded, tmp_path, capsys):
    d = _copy(sharded, tmp_path)
    wm = _index(d)["weight_map"]
    name = "model.layers.2.mlp.experts.4.up_proj.weight"
    _rewrite(d / wm[name], lambda sd: sd.pop(name))
    _refused(capsys, d, name, wm[name], "does not contain it")


def test_in_shard_absent_from_index(sharded, tmp_path, capsys):
    d = _copy(sharded, tmp_path)
    idx = _index(d)
    name = "model.layers.0.mlp.shared_expert.down_proj.weight"
    shard = idx["weight_map"].pop(name)
    (d / INDEX).write_text(json.dumps(idx))
    _refused(capsys, d, name, shard, "not listed in")


def test_same_tensor_in_two_shards(sharded, tmp_path, capsys):
    d = _copy(sharded, tmp_path)
    wm = _index(d)["weight_map"]
    name = "model.layers.0.mlp.experts.1.gate_proj.weight"
    other = next(f for f in sorted(set(wm.values())) if f != wm[name])
    t = load_file(str(d / wm[name]))[name]
    _rewrite(d / other, lambda sd: sd.__setitem__(name, t))
    _refused(capsys, d, name, "stored twice", wm[name], other)


def test_index_points_at_wrong_shard(sharded, tmp_path, capsys):
    d = _copy(sharded, tmp_path)
    idx = _index(d)
    name = "model.embed_tokens.weight"
    real = idx["weight_map"][name]
    idx["weight_map"][name] = next(f for f in sorted(set(idx["weight_map"].values())) if f != real)
    (d / INDEX).write_text(json.dumps(idx))
    _refused(capsys, d, name, f"stored in {real}")


def test_duplicate_key_in_index(sharded, tmp_path, capsys):
    d = _copy(sharded, tmp_path)
    text = (d / INDEX).read_text()
    line = next(ln for ln in text.splitlines() if "embed_tokens" in ln)
    (d / INDEX).write_text(text.replace(line, line.rstrip(",") + ",\n" + line.rstrip(",") + ","))
    _refused(capsys, d, "model.embed_tokens.weight", "listed twice")


def test_two_files_without_index_holding_one_tensor(tiny_dirs, tmp_path, capsys):
    src = tiny_dirs["olmoe"][1]
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    sd = load_file(str(src / "model.safetensors"))
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[: len(keys) // 2 + 1]}, str(d / "a.safetensors"))
    save_file({k: sd[k] for k in keys[len(keys) // 2:]}, str(d / "b.safetensors"))
    _refused(capsys, d, keys[len(keys) // 2], "stored twice", "a.safetensors", "b.safetensors")


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_config_expert_count_below_disk(tiny_dirs, tmp_path, capsys, model_type):
    """config.json says fewer experts than the files hold: refused by inspect, Checkpoint and fit."""
    d = _copy(tiny_dirs[model_type][1], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    key = next(k for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in cfg)
    assert cfg[key] == 6
    cfg[key] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, d, "expert 4 on disk", "4 experts per layer")
    out = tmp_path / "fit"
    rc = main(["fit", f"model.path={d}", f"output_dir={out}", "train.steps=2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "expert 4 on disk" in err and not out.exists()


def test_config_expert_count_above_disk(tiny_dirs, tmp_path, capsys):
    d = _copy(tiny_dirs["olmoe"][1], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_experts"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, d, "missing expert tensors", "experts.6.")


@pytest.mark.parametrize("key", ["hidden_size", "moe_intermediate_size"])
def test_config_widths_disagree(tiny_dirs, tmp_path, capsys, key):
    d = _copy(tiny_dirs["deepseek_v2"][1], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] += 8
    (d / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, d, "config.json implies")


def test_fused_layout_count_disagrees(tiny_dirs, tmp_path, capsys):
    model, src = tiny_dirs["qwen3_moe"]
    d = tmp_path / "m"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_local_experts"] = 5
    (d / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, d, "gate_up_proj", "[6, 48, 32]", "[5, 48, 32]")


def test_integer_expert_weights_refused(tiny_dirs, tmp_path, capsys):
    d = _copy(tiny_dirs["olmoe"][1], tmp_path)
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    _rewrite(d / "model.safetensors", lambda sd: sd.__setitem__(name, sd[name].to(__import__("torch").int32)))
    _refused(capsys, d, name, "floating point")

"""One compressed format: fit directories, globe exports, old versions, sharding, every architecture."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from globe import compat
from globe.artifacts import Artifacts
from globe.config import GlobeConfig
from globe.errors import GlobeError
from globe.runtime import patch_model
from globe.runtime.export import run_export as export
from globe.runtime.load import load_model
from globe.testing.artifacts import dense_reference, random_artifacts
from globe.testing.models import TINY, save_model, tiny_model


def _cfg(src, arts, out, **export_kw):
    return GlobeConfig.from_dict(dict(model=dict(path=str(src)), artifacts=str(arts), output_dir=str(out),
                                      export=export_kw))


@torch.no_grad()
def _logits(model, vocab=90, seed=0):
    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))
    return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_export_both_formats_every_architecture(tiny_dirs, tmp_path, model_type):
    """globe export reloads to exactly the in-memory patched model; dense export loads in plain
    transformers with logits of the dense reconstruction; nothing is left randomly initialised."""
    from transformers import AutoModelForCausalLM

    model, src = tiny_dirs[model_type]
    arts = random_artifacts(model, m=4, r=6, support=2, seed=3, banks=2)
    arts.save(tmp_path / "arts")
    g = export(_cfg(src, tmp_path / "arts", tmp_path / "g", dtype="fp32"))
    d = export(_cfg(src, tmp_path / "arts", tmp_path / "d", format="dense", dtype="fp32"))
    mem = compat.load_pretrained(src, torch.float32)
    patch_model(mem, tmp_path / "arts")
    assert torch.equal(_logits(load_model(g)), _logits(mem))
    plain = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    ref = dense_reference(compat.load_pretrained(src, torch.float32), arts)
    torch.testing.assert_close(_logits(plain), _logits(ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(mem), _logits(ref), rtol=1e-4, atol=1e-4)


def test_sharded_exports_and_index(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    model, src = tiny_dirs["qwen2_moe"]
    arts = random_artifacts(model, m=4, r=6, support=2, seed=1)
    arts.save(tmp_path / "arts")
    for fmt in ("dense", "globe"):
        out = export(_cfg(src, tmp_path / "arts", tmp_path / fmt, format=fmt, dtype="fp32", max_shard_gb=2e-5))
        shards = sorted(p.name for p in out.glob("model-*.safetensors"))
        idx = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(shards) > 2 and sorted(set(idx["weight_map"].values())) == shards
        for s in shards:
            load_file(str(out / s))  # every shard is a valid safetensors file for the library
        if fmt == "dense":
            plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
            torch.testing.assert_close(_logits(plain), _logits(dense_reference(
                compat.load_pretrained(src, torch.float32), arts)), rtol=1e-5, atol=1e-5)
        else:
            mem = compat.load_pretrained(src, torch.float32)
            patch_model(mem, arts)
            assert torch.equal(_logits(load_model(out)), _logits(mem))


def test_fit_dir_and_export_share_family_tensors(tiny_dirs, tmp_path):
    """The export holds the fit's family tensors under the same names (cast to the export dtype)."""
    model, src = tiny_dirs["qwen2_moe"]
    arts = random_artifacts(model, m=4, r=6, support=2, seed=2)
    arts.save(tmp_path / "arts")
    out = export(_cfg(src, tmp_path / "arts", tmp_path / "g", dtype="bf16"))
    fit_t = {}
    for f in ("globe-up.safetensors", "globe-gate.safetensors"):
        fit_t.update(load_file(str(tmp_path / "arts" / f)))
    exp_t = load_file(str(out / "model.safetensors"))
    assert set(fit_t) <= set(exp_t)
    for k, v in fit_t.items():
        want = v.to(torch.bfloat16) if k.rsplit(".", 1)[1].startswith(("bank", "A_")) else v
        assert exp_t[k].dtype == want.dtype and torch.equal(exp_t[k], want), k
    back = Artifacts.load(out)  # the same reader opens an export
    assert torch.equal(back.families["up"].codes, arts.families["up"].codes)


def test_version1_fit_dir_is_converted(tiny_dirs, tmp_path):
    """A fit directory written by format version 1 (dense codes, one (N, p, r) A) still loads."""
    model, src = tiny_dirs["qwen2_moe"]
    arts = random_artifacts(model, m=4, r=6, support=2, seed=4, col_scale=True)
    old = tmp_path / "v1"
    old.mkdir()
    t, fams = {}, {}
    for f, fa in arts.families.items():
        t.update({f"{f}.bank": fa.bank[0], f"{f}.codes": fa.codes, f"{f}.A": fa.A,
                  f"{f}.gain": fa.gain[0].reshape(()), f"{f}.col_scale": fa.col_scale})
        fams[f] = {"m": 4, "r": 6, "activation": "silu", "map": "random"}
    save_file(t, str(old / "globe.safetensors"))
    (old / "globe_config.json").write_text(json.dumps({
        "format": "globe-artifacts", "version": 1, "model_type": "qwen2_moe", "source": "",
        "moe_layers": arts.moe_layers, "num_experts": arts.num_experts, "hidden_size": arts.hidden_size,
        "expert_intermediate_size": arts.expert_intermediate_size, "families": fams, "config": {}}))
    back = Artifacts.load(old)
    for f, fa in arts.families.items():
        assert torch.equal(back.families[f].reconstruct(), fa.reconstruct())
    mem = compat.load_pretrained(src, torch.float32)
    patch_model(mem, old)
    torch.testing.assert_close(_logits(mem), _logits(dense_reference(compat.load_pretrained(src, torch.float32),
                                                                     arts)), rtol=1e-4, atol=1e-4)


def test_old_export_and_unknown_version_refused(tmp_path):
    old = tmp_path / "oldexport"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", "globe": {"format": "globe-model",
                                                                                      "version": 1}}))
    with pytest.raises(GlobeError, match="version 1 .*export it again"):
        load_model(old)
    with pytest.raises(GlobeError, match="version 1 .*export it again"):
        Artifacts.load(old)
    new = tmp_path / "future"
    new.mkdir()
    (new / "globe_config.json").write_text(json.dumps({"format": "globe", "version": 9}))
    with pytest.raises(GlobeError, match="version 9"):
        Artifacts.load(new)


def test_missing_non_expert_tensor_is_refused(tmp_path):
    """A checkpoint without e.g. the final norm: export refuses by name instead of a random init."""
    model = tiny_model("qwen2_moe")
    src = save_model(model, tmp_path / "src")
    arts = random_artifacts(model, m=4, r=6, support=2)
    arts.save(tmp_path / "arts")
    t = load_file(str(src / "model.safetensors"))
    del t["model.norm.weight"]
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    for fmt in ("globe", "dense"):
        with pytest.raises(GlobeError, match="lacks tensor model.norm.weight"):
            export(_cfg(src, tmp_path / "arts", tmp_path / fmt, format=fmt))
        assert not (tmp_path / fmt).exists()


def test_export_lacking_a_tensor_is_refused_at_load(tiny_dirs, tmp_path):
    model, src = tiny_dirs["qwen2_moe"]
    arts = random_artifacts(model, m=4, r=6, support=2)
    arts.save(tmp_path / "arts")
    out = export(_cfg(src, tmp_path / "arts", tmp_path / "g", dtype="fp32"))
    t = load_file(str(out / "model.safetensors"))
    del t["model.layers.0.self_attn.q_proj.weight"]
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GlobeError, match="missing tensor model.layers.0.self_attn.q_proj.weight"):
        load_model(out)


def test_memory_check_names_the_figure_and_a_mode_that_fits(tiny_dirs, tmp_path, monkeypatch):
    from globe.runtime import load as load_mod

    model, src = tiny_dirs["qwen2_moe"]
    arts = random_artifacts(model, m=4, r=6, support=2)
    arts.save(tmp_path / "arts")
    out = export(_cfg(src, tmp_path / "arts", tmp_path / "g", dtype="fp32"))
    meta = json.loads((out / "config.json").read_text())["globe"]
    from globe.config import CacheCfg
    from globe.io.tensors import TensorDir
    est = load_mod.estimate_bytes(meta, TensorDir(out, "model"), CacheCfg(mode="full", S_per_layer=4), torch.float32)
    m = est["modes"]
    assert m["none"] < m["lru"] < m["full"]
    # full adds exactly one (E, R, d) table per MoE layer: 2 layers x 6 experts x (6 + 6) rows x 32 x 4 bytes
    assert m["full"] - est["base"] == 2 * 6 * 12 * 32 * 4
    monkeypatch.setattr(load_mod, "OVERHEAD_MIN", 0)
    monkeypatch.setattr(load_mod, "available_bytes", lambda dev: int(m["lru"] * (1 + load_mod.OVERHEAD)) + 1)
    with pytest.raises(GlobeError, match=r"cache.mode=full needs .*; "
                                         r"cache.mode=(lru cache.S_per_layer=\d+|none) needs"):
        load_model(out, cache=CacheCfg(mode="full", S_per_layer=4))
    load_model(out, cache=CacheCfg(mode="lru", S_per_layer=4, warmup_tokens=0))  # fits: loads
    # an lru that does not fit names the largest S_per_layer that does with room to spare (here 3 of 6)
    monkeypatch.setattr(load_mod, "HINT_ROOM", 1.0)
    room = int((est["base"] + 2 * 3 * est["block"]) * (1 + load_mod.OVERHEAD)) + 1
    monkeypatch.setattr(load_mod, "available_bytes", lambda dev: room)
    with pytest.raises(GlobeError, match=r"cache.mode=lru cache.S_per_layer=5 needs .*; cache.mode=lru "
                                         r"cache.S_per_layer=3 needs"):
        load_model(out, cache=CacheCfg(mode="lru", S_per_layer=5))


def test_memory_hint_at_full_size():
    """Qwen1.5-MoE-A2.7B's globe export (r 704, bf16): base 18.5e9 bytes, one block (2 r, d) = 5.77 MB,
    24 layers, 60 experts, 24.3e9 bytes available. Worked out by hand: S <= (0.95 * 24.3e9 / 1.12 - 18.5e9)
    / (24 * 5.767e6) = 15.26, rounded down to a multiple of 4 -> 12, which needs (18.5e9 + 24 * 12 * 5.767e6)
    * 1.12 = 22.58e9 bytes."""
    from globe.runtime import load as load_mod

    blk = 2 * 704 * 2048 * 2
    est = {"base": 18.5e9, "modes": {"none": 18.5e9 + 8 * blk}, "block": blk}
    hint = load_mod._fitting_hint(est, {"moe_layers": list(range(24)), "num_experts": 60}, int(24.3e9))
    assert hint.startswith("; cache.mode=lru cache.S_per_layer=12 needs about 22.6 GB"), hint
    assert load_mod.OVERHEAD == 0.12 and load_mod.HINT_ROOM == 0.95  # the constants the figures above assume


def test_inspect_a_globe_export(tiny_dirs, tmp_path, capsys):
    from globe.cli.main import main
    from globe.io.inspect import inspect

    model, src = tiny_dirs["qwen2_moe"]
    arts = random_artifacts(model, m=4, r=6, support=2, banks=2)
    arts.save(tmp_path / "arts")
    out = export(_cfg(src, tmp_path / "arts", tmp_path / "g", dtype="bf16"))
    info = inspect(str(out))
    assert info["format"] == "globe" and info["model_type"] == "qwen2_moe" and info["moe_layers"] == [0, 2]
    for f, fa in arts.families.items():
        assert info["families"][f]["stored_params"] == fa.stored_params()
        assert info["families"][f]["banks"] == 2 and info["families"][f]["nnz"] == fa.nnz()
    assert main(["inspect", str(out)]) == 0
    assert "globe export of a qwen2_moe model (bf16)" in capsys.readouterr().out


def test_export_reports_its_size_against_the_source_files(tmp_path, caplog):
    """The logged ratio compares files with files: a dense export in the source's dtype is the same size (it
    read 0.976 when tensor bytes were divided by whole files, headers included)."""
    import logging

    from globe.testing.models import FIXTURE_DIR

    arts = random_artifacts(compat.load_pretrained(FIXTURE_DIR, torch.float32), m=4, r=6, support=2, seed=3)
    arts.save(tmp_path / "arts")
    with caplog.at_level(logging.INFO, logger="globe"):
        out = export(_cfg(FIXTURE_DIR, tmp_path / "arts", tmp_path / "d", format="dense", dtype="bf16"))
    src = sum(f.stat().st_size for f in FIXTURE_DIR.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) == src
    assert "ratio 1.000" in caplog.text

"""Export -> reload gives identical logits; dense export loads with plain transformers; bad input errors."""

from __future__ import annotations

import json

import pytest
import torch

import globe
from globe import compat
from globe.common import DTYPES
from globe.config import GenerateCfg, GlobeConfig
from globe.errors import GlobeError
from globe.runtime import patch_model
from globe.runtime.export import is_globe_dir
from globe.runtime.export import run_export as export
from globe.runtime.generate import generate
from globe.runtime.load import load_model
from globe.testing.artifacts import random_artifacts
from globe.testing.models import fixture_path, save_model, tiny_model

IDS = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny qwen2_moe (with a fake tokenizer file) and matching random artifacts."""
    root = tmp_path_factory.mktemp("exp")
    model = tiny_model("qwen2_moe")
    src = save_model(model, root / "src")
    (src / "tokenizer_config.json").write_text("{}")
    arts = random_artifacts(model, m=4, r=6, support=2, seed=7)
    arts.save(root / "arts")
    return root, src, arts


def _cfg(src, arts_dir, out, **export):
    return GlobeConfig.from_dict(dict(model=dict(path=str(src)), artifacts=str(arts_dir), output_dir=str(out),
                                      export=export))


@torch.no_grad()
def _logits(m, ids=IDS):
    return m(input_ids=ids).logits


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("save_mixed", [False, True])
def test_globe_export_reload_identical(setup, dtype, save_mixed):
    root, src, arts = setup
    out = root / f"g_{dtype}_{save_mixed}"
    assert export(_cfg(src, root / "arts", out, format="globe", dtype=dtype, save_mixed=save_mixed)) == out
    assert is_globe_dir(out) and not is_globe_dir(src)
    assert (out / "tokenizer_config.json").is_file()
    from transformers import AutoModelForCausalLM
    with pytest.raises((ValueError, KeyError, OSError)):  # loud refusal, never experts filled at random
        AutoModelForCausalLM.from_pretrained(str(out))
    meta = json.loads((out / "config.json").read_text())["globe"]
    assert meta["save_mixed"] == save_mixed and meta["dtype"] == dtype
    mem = compat.load_pretrained(src, DTYPES[dtype])
    patch_model(mem, root / "arts")  # the in-memory patched model, from the same artifact files
    reloaded = load_model(out)
    a, b = _logits(mem), _logits(reloaded)
    assert b.dtype == DTYPES[dtype]
    assert torch.equal(a, b)
    assert reloaded.get_output_embeddings()._globe_canonical and mem.get_output_embeddings()._globe_canonical
    for mode in ("lru", "none"):  # other cache settings at load time give the same logits
        other = load_model(out, cache=GlobeConfig.from_dict({"cache": {"mode": mode, "S_per_layer": 2,
                                                                       "warmup_tokens": 8}}).cache)
        assert torch.equal(_logits(other), a)
    if dtype == "fp32" and not save_mixed:  # compressed experts: smaller than the original on disk
        assert meta["bytes_on_disk"] < meta["original_bytes"]
        weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        assert meta["bytes_on_disk"] <= weights < meta["bytes_on_disk"] + 64 * 1024  # + headers


def test_dense_export_loads_with_plain_transformers(setup):
    from transformers import AutoModelForCausalLM

    root, src, arts = setup
    out = export(_cfg(src, root / "arts", root / "dense", format="dense", dtype="fp32"))
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    mem = compat.load_pretrained(src, torch.float32)
    orig = _logits(mem)
    patch_model(mem, arts)
    torch.testing.assert_close(_logits(plain), _logits(mem), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(plain), orig, atol=1e-3)
    assert not is_globe_dir(out)


def test_output_dir_not_empty_and_no_leftovers(setup):
    root, src, _ = setup
    out = root / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(GlobeError, match="not empty"):
        export(_cfg(src, root / "arts", out, format="globe"))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = root / "empty_ok"
    empty.mkdir()
    export(_cfg(src, root / "arts", empty, format="globe"))  # an existing empty dir is fine
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_mismatched_or_broken_artifacts(setup, tmp_path):
    root, src, _ = setup
    other = tiny_model("mixtral")
    random_artifacts(other, m=2, r=2).save(tmp_path / "mix_arts")
    with pytest.raises(GlobeError, match="do not match") as ei:
        export(_cfg(src, tmp_path / "mix_arts", tmp_path / "o1", format="globe"))
    assert "\n" not in str(ei.value) and not (tmp_path / "o1").exists()
    fewer = random_artifacts(tiny_model("qwen2_moe", num_experts=4), m=2, r=2)
    fewer.save(tmp_path / "few")
    with pytest.raises(GlobeError, match="experts per layer"):
        export(_cfg(src, tmp_path / "few", tmp_path / "o2", format="dense"))
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "globe_config.json").write_bytes((root / "arts" / "globe_config.json").read_bytes())
    for f in ("globe.safetensors.index.json", "globe-gate.safetensors"):
        (trunc / f).write_bytes((root / "arts" / f).read_bytes())
    data = (root / "arts" / "globe-up.safetensors").read_bytes()
    (trunc / "globe-up.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GlobeError, match="truncated"):
        export(_cfg(src, trunc, tmp_path / "o3", format="globe"))
    (trunc / "globe-up.safetensors").unlink()
    with pytest.raises(GlobeError, match="missing file globe-up"):
        export(_cfg(src, trunc, tmp_path / "o3b", format="globe"))
    (trunc / "globe_config.json").unlink()
    with pytest.raises(GlobeError, match="missing artifact file"):
        export(_cfg(src, trunc, tmp_path / "o4", format="globe"))
    with pytest.raises(GlobeError, match="artifacts"):
        export(GlobeConfig.from_dict(dict(model=dict(path=str(src)), output_dir=str(tmp_path / "o5"))))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("o", ".o"))]


def test_truncated_globe_weights_fail_to_load(setup, tmp_path):
    root, src, _ = setup
    out = export(_cfg(src, root / "arts", tmp_path / "g", format="globe", dtype="fp32"))
    w = out / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) - 100])
    with pytest.raises(GlobeError, match="truncated"):
        load_model(out)


def test_fixture_generate_globe_and_dense_exports(tmp_path):
    fx = fixture_path()
    base = compat.load_pretrained(fx, torch.float32)
    arts = random_artifacts(base, m=8, r=44, support=3, seed=9)
    arts.save(tmp_path / "arts")
    g = export(_cfg(fx, tmp_path / "arts", tmp_path / "g", format="globe", dtype="fp32"))
    d = export(_cfg(fx, tmp_path / "arts", tmp_path / "d", format="dense", dtype="fp32"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (fx / name).exists():
            assert (g / name).is_file() and (d / name).is_file()
    ids = torch.randint(3, 4000, (1, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(load_model(g), ids), _logits(load_model(d), ids), rtol=1e-4, atol=1e-4)
    texts = [globe.generate(p, GenerateCfg(prompt="Once upon a time", max_new_tokens=8)) for p in (g, d)]
    assert texts[0] == texts[1] and texts[0].startswith("Once upon a time")
    with pytest.raises(GlobeError, match="prompt"):
        generate(GlobeConfig.from_dict(dict(model=dict(path=str(g)))))
    with pytest.raises(ValueError, match="config: expected a GenerateCfg"):
        globe.generate(g, dict(prompt="x"))
    with pytest.raises(ValueError, match="generate.max_new_tokens"):
        GenerateCfg(prompt="x", max_new_tokens=0)

"""Bad input found by the previous stop's bad-input trial: one line, exit 2 (CLI) or ValueError/GlobeError naming
the problem (Python); sizes a user can type never allocate beyond what the model can use."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from cli_helpers import edit_config, one_line
from safetensors.torch import load_file, save_file

import globe
from globe.config import EvalCfg
from globe.fixtures import FIXTURE_DIR

TEXT = FIXTURE_DIR / "eval.txt"


@pytest.fixture
def globe_export(random_export):
    return random_export


def _with_top_k(src, dst, k):
    return edit_config(src, dst, lambda c: c.update(num_experts_per_tok=k))


@pytest.mark.parametrize("k", [0, 61, "4", True])
def test_top_k_checked_on_every_path(k, capsys, tmp_path, globe_export):
    """eval / generate / export of an original checkpoint and of a globe export all refuse a top-k outside
    [1, num_experts] in one line (transformers would route 0 experts silently or fail inside topk)."""
    orig = _with_top_k(FIXTURE_DIR, tmp_path / "orig", k)
    exp = _with_top_k(globe_export[0], tmp_path / "exp", k)
    for argv in (["eval", f"model.path={orig}", f"eval.text={TEXT}", "eval.max_tokens=64"],
                 ["eval", f"model.path={exp}", f"eval.text={TEXT}", "eval.max_tokens=64"],
                 ["generate", f"model.path={orig}", "prompt=hi", "max_new_tokens=2"],
                 ["generate", f"model.path={exp}", "prompt=hi", "max_new_tokens=2"],
                 ["export", f"model.path={orig}", f"artifacts={globe_export[1]}", f"output_dir={tmp_path / 'o'}"]):
        line = one_line(capsys, argv)
        assert "num_experts_per_tok" in line and "expected an integer in [1, " in line, (argv[0], line)
    assert not (tmp_path / "o").exists()


def test_generate_stops_at_non_finite_logits(capsys, tmp_path):
    d = tmp_path / "nan"
    shutil.copytree(FIXTURE_DIR, d)
    sd = load_file(str(d / "model.safetensors"))
    # finite weights (a NaN weight is refused at load), whose product overflows fp32 in the logits
    sd["model.norm.weight"] = torch.full_like(sd["model.norm.weight"], 3e38)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    line = one_line(capsys, ["generate", f"model.path={d}", "prompt=hello", "max_new_tokens=4", "generate.dtype=fp32"])
    assert "logits are not finite at new token 1" in line, line


def test_cache_size_above_the_expert_count_is_the_expert_count(globe_export, tmp_path):
    """S_per_layer / S_values beyond num_experts allocate num_experts slots and give the S = E figures."""
    from globe.runtime.cache import SlabCache, simulate_lru

    c = SlabCache(10**12, 6, (4, 3), torch.float32, "cpu", lambda ids, out: None)
    assert c.capacity == 6 and tuple(c.slab.shape) == (6, 4, 3)
    trace = [[0, 1], [2, 3], [4, 5], [1, 0], [5, 2]]
    assert simulate_lru(trace, 10**12) == simulate_lru(trace, 6)
    model = globe.load_model(globe_export[0], cache=globe.CacheCfg(mode="lru", S_per_layer=10**12, warmup_tokens=0))
    E = model.config.num_experts
    res = globe.evaluate(globe_export[0], EvalCfg(text=str(TEXT), max_tokens=128, hit_rate=True,
                                                  S_values=[E, 10**12]))
    assert res["hit_rate_by_S"][str(E)] == res["hit_rate_by_S"][str(10**12)] > 0
    model(input_ids=torch.arange(16).unsqueeze(0))  # the lru slabs are made on first use
    assert [m.slab.capacity for m in _globe_layers(model)] == [E] * len(_globe_layers(model))


def _globe_layers(model):
    from globe.runtime.patch import globe_layers

    return globe_layers(model).values()


def test_eval_threads_beyond_the_cpus_is_refused():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    EvalCfg(threads=cpus)
    with pytest.raises(ValueError, match=r"eval.threads: must be between 1 and"):
        EvalCfg(threads=cpus + 1)
    with pytest.raises(ValueError, match="eval.threads"):
        EvalCfg(threads=100000)


def test_lru_warmup_draws_ids_a_chunk_at_a_time(globe_export, monkeypatch):
    """cache.warmup_tokens of any size costs one chunk of ids, not tokens x 8 bytes at once."""
    from globe.runtime import patch

    model = globe.load_model(globe_export[0], cache=globe.CacheCfg(mode="lru", S_per_layer=2, warmup_tokens=0))
    sizes, real = [], torch.randint

    def spy(*a, **k):
        out = real(*a, **k)
        sizes.append(out.numel())
        return out
    monkeypatch.setattr(torch, "randint", spy)
    seen = []
    h = model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["input_ids"].shape[-1]),
                                        with_kwargs=True)
    patch.warmup(model, None, 1100, chunk=512)
    h.remove()
    assert seen == [512, 512, 76] and max(sizes) <= 512 and sum(sizes) == 1100

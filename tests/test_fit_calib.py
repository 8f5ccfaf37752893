"""Activation-aware pieces: row weights equal an independent computation; unit weights change nothing;
layer-wise calibration (one decoder layer at a time) equals running the whole model."""

from __future__ import annotations

import pytest
import torch

from globe.config import GlobeConfig
from globe.fit.calib import row_weights
from globe.fit.loop import evaluate
from globe.fit.model import GlobeParams
from globe.io.checkpoint import Checkpoint
from globe.testing.models import FIXTURE_DIR, TINY, fixture_path


def test_row_weights_match_direct_computation(tmp_path):
    ck = Checkpoint(fixture_path())
    text = tmp_path / "calib.txt"
    text.write_text((fixture_path() / "eval.txt").read_text()[:3000])
    w = row_weights(ck, text, n_tokens=256)
    N, p = len(ck.moe_layers) * ck.num_experts, ck.p
    assert w["up"].shape == w["gate"].shape == (N, p)
    assert torch.isfinite(w["up"]).all() and torch.allclose(w["up"].mean(1), torch.ones(N), atol=1e-4)

    # Independent path: the routing transformers itself hands to the experts module.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ck.dir)
    ids = tok(text.read_text(), return_tensors="pt")["input_ids"][0][:256]
    model = AutoModelForCausalLM.from_pretrained(ck.dir, dtype=torch.float32).eval()
    L = ck.moe_layers[1]
    seen = {}
    ex = model.model.layers[L].mlp.experts
    h = ex.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach(), top=a[1].detach()))
    with torch.no_grad():
        model(ids[None])
    h.remove()
    e = int(seen["top"][:, 0].mode().values)  # an expert that certainly received tokens
    xs = seen["x"][(seen["top"] == e).any(-1)]
    g = xs @ ex.gate_up_proj[e, :p].T
    want = torch.nn.functional.silu(g).pow(2).mean(0) * ex.down_proj[e].pow(2).sum(0)
    want = want / want.mean()
    got = w["up"][ck.moe_layers.index(L) * ck.num_experts + e]
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4)


def test_unit_row_weights_leave_the_objective_unchanged():
    g = torch.Generator().manual_seed(0)
    W, s = torch.randn(6, 5, 7, generator=g), torch.ones(6)
    cfg = GlobeConfig()
    prm = GlobeParams(torch.randn(3, 4, 7, generator=g), torch.randn(6, 3, generator=g), 1.0, "silu",
                      cfg.sparsity.map, cfg.sparsity.alpha)
    a = evaluate(W, s, prm, 1.0)
    b = evaluate(W, s, prm, 1.0, rows=lambda idx: torch.ones(len(idx), 5))
    c = evaluate(W, s, prm, 1.0, rows=lambda idx: torch.rand(len(idx), 5, generator=g) + 0.1)
    assert a["objective"] == b["objective"] and a["rel_fro_error"] == b["rel_fro_error"]
    assert c["objective"] != a["objective"] and c["rel_fro_error"] == a["rel_fro_error"]  # A is row-separable


# ---- layer-wise calibration == the whole model ------------------------------------------------------
def whole_model_pass(ck, ids, context, make_hook):
    """Reference: the previous calibration path, the whole model loaded by from_pretrained in fp32."""
    from transformers import AutoModelForCausalLM

    from globe import compat

    model = AutoModelForCausalLM.from_pretrained(ck.dir, dtype=torch.float32).eval()

    def wrap(fn):
        def pre(_mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            top = args[1] if len(args) > 1 else kwargs["top_k_index"]
            x = x.reshape(-1, x.shape[-1])
            fn(x, top.reshape(x.shape[0], -1))
        return pre

    hooks = [compat.get_experts(model, L).register_forward_pre_hook(wrap(make_hook(L, compat.get_experts(model, L))),
                                                                    with_kwargs=True) for L in ck.moe_layers]
    with torch.no_grad():
        for a in range(0, ids.numel(), context):
            model(ids[a:a + context][None])
    for h in hooks:
        h.remove()


def both_paths(monkeypatch, ck, ids, context=64):
    """calibration_stats (covariances per layer and per expert, row weights) layer-wise and whole-model."""
    import transformers

    from globe.fit import calib

    monkeypatch.setattr(calib, "calib_ids", lambda *a: ids)

    def no_whole_model(*a, **k):
        raise AssertionError("layer-wise calibration instantiated the whole model")
    with monkeypatch.context() as mp:
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_whole_model)
        new = calib.calibration_stats(ck, "unused.txt", ids.numel(), per_expert=True, rows=True, context=context,
                                      counts=True)
    monkeypatch.setattr(calib, "_calib_pass", lambda ck_, text, n, ctx, make, progress=None:
                        whole_model_pass(ck_, ids, ctx, make))
    old = calib.calibration_stats(ck, "unused.txt", ids.numel(), per_expert=True, rows=True, context=context,
                                  counts=True)
    return new, old


def assert_same(new, old):
    """Bitwise equal: the same layer code runs on the same inputs in the same order."""
    (c1, p1, r1, n1, _), (c2, p2, r2, n2, _) = new, old
    same = torch.equal
    assert c1.keys() == c2.keys() and all(same(c1[L], c2[L]) for L in c1)
    assert p1.keys() == p2.keys() and all(p1[k][1] == p2[k][1] and same(p1[k][0], p2[k][0]) for k in p1)
    assert all(same(r1[f], r2[f]) for f in ("up", "gate"))
    assert same(n1, n2)


def assert_counts_match(ck, stats):
    """The routing counts (N,), layer-major, equal the per-expert covariances' token counts (counted there by
    a mask per expert, here by one bincount per layer)."""
    _, per, _, counts, _ = stats
    E = ck.num_experts
    want = torch.tensor([float(per[(L, e)][1]) if (L, e) in per else 0.0 for L in ck.moe_layers for e in range(E)],
                        dtype=torch.float64)
    assert counts.shape == (len(ck.moe_layers) * E,) and torch.equal(counts, want)


def test_layerwise_calibration_equals_whole_model_on_the_fixture(monkeypatch):
    """Bitwise: every decoder layer computes on exactly the inputs the whole model would give it."""
    from globe.fit.calib import calib_ids

    ck = Checkpoint(fixture_path())
    ids = calib_ids(ck, fixture_path() / "eval.txt", 600)  # 3 sequences of 256, 256 and 88 tokens
    new, old = both_paths(monkeypatch, ck, ids, context=256)
    assert_same(new, old)
    assert sum(n for _, n in new[1].values()) == 600 * ck.top_k * len(ck.moe_layers)  # every routed token seen
    assert_counts_match(ck, new)


@pytest.mark.parametrize("model_type", list(TINY))
def test_layerwise_calibration_equals_whole_model_for_every_architecture(monkeypatch, tiny_dirs, model_type):
    """Masks per layer type, rotary variants, dense-first layers: all come from the model's own forward."""
    _, path = tiny_dirs[model_type]
    ck = Checkpoint(path)
    vocab = int(ck.config["vocab_size"])
    ids = torch.randint(vocab, (150,), generator=torch.Generator().manual_seed(0))
    new, old = both_paths(monkeypatch, ck, ids, context=64)
    assert_same(new, old)
    assert_counts_match(ck, new)


def test_per_expert_covariances_too_big_are_refused_before_any_work(tmp_path):
    from globe.errors import GlobeError
    from globe.fit.run import run_fit

    text = tmp_path / "calib.txt"
    text.write_text("some text " * 50)
    cfg = GlobeConfig.from_dict({"model": {"path": str(fixture_path())}, "output_dir": str(tmp_path / "o"),
                                 "train": {"objective": "activation", "calib_text": str(text),
                                           "calib_per_expert": True, "max_memory_gb": 0.01}})
    with pytest.raises(GlobeError, match=r"train\.calib_per_expert: per-expert covariances of 64 experts need"):
        run_fit(cfg, progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("n", [2, 300, 4096, 9000, 10 ** 6])
@pytest.mark.parametrize("lines", [True, False])
@pytest.mark.parametrize("guess", [8, 0.01])
def test_calibration_ids_are_the_whole_texts_first_tokens(tmp_path, monkeypatch, n, lines, guess):
    """calib_ids tokenizes only a prefix of the text (grown until it holds n tokens and a margin): its ids
    equal the first n of the whole text's, with line ends and on one long line, below and above the text's
    length, from a first prefix long enough or far too short (a wrong cut would drop or change tokens at
    the prefix's end)."""
    from globe import compat
    from globe.fit import calib

    monkeypatch.setattr(calib, "CHARS_PER_TOKEN", guess)  # 0.01: the prefix is doubled many times

    body = (FIXTURE_DIR / "eval.txt").read_text()
    if not lines:
        body = body.replace("\n", " ")
    text = tmp_path / "calib.txt"
    text.write_text(body)
    tok = compat.load_tokenizer(FIXTURE_DIR, "calibration")
    whole = tok(body, return_tensors="pt", verbose=False)["input_ids"][0]
    got = calib.calib_ids(Checkpoint(FIXTURE_DIR), text, n)
    assert torch.equal(got, whole[:n])

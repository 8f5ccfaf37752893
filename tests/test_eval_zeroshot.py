"""Zero-shot through lm-eval-harness, offline, on a local 4-way multiple-choice task
(tests/data/lm_eval_tasks: true sentence continuation vs word-order shuffles, from the fixture's
held-out eval.txt; chance 0.25): the trained fixture scores far above chance, a GloBE-patched
model scores exactly like its dense reference, `run_eval` and the CLI plumb tasks, paths, limit,
and bad task names fail in one line before the model loads."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from globe.config import EvalCfg, GlobeConfig
from globe.errors import GlobeError

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's HFLM needs it (the `lm-eval[hf]` extra)

from globe.eval.run import run_eval  # noqa: E402
from globe.eval.zeroshot import validate_tasks, zero_shot  # noqa: E402
from globe.testing.models import fixture_path  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
TASK = "globe_fixture_mc"


@pytest.fixture(scope="module")
def fixture():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = str(fixture_path())
    return AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(p)


@pytest.fixture(scope="module")
def manager():
    return validate_tasks([TASK], [str(TASKS)])


def _acc(res: dict) -> float:
    acc = res[TASK]["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    return acc


def test_fixture_beats_chance_on_local_task(fixture, manager):
    model, tok = fixture
    res = zero_shot(model, tok, [TASK], batch_size=4, manager=manager)
    assert res[TASK]["sample_len"] == 20
    assert 0.0 <= res[TASK]["acc_norm,none"] <= 1.0
    assert _acc(res) >= 0.7  # chance 0.25; measured 1.0 (20/20)
    small = zero_shot(model, tok, [TASK], limit=5, manager=manager)  # limit reaches lm-eval; batch 1 path
    assert small[TASK]["sample_len"] == 5


def test_patched_model_matches_dense_reference(fixture, manager):
    from globe.runtime.patch import patch_model
    from globe.testing.artifacts import dense_reference, random_artifacts

    model, tok = fixture
    arts = random_artifacts(model, m=8, support=3, seed=1)
    patched = patch_model(copy.deepcopy(model), arts)
    dense = dense_reference(copy.deepcopy(model), arts)
    got = zero_shot(patched, tok, [TASK], batch_size=8, manager=manager)[TASK]
    want = zero_shot(dense, tok, [TASK], batch_size=8, manager=manager)[TASK]
    assert got["sample_len"] == want["sample_len"] == 20
    assert got["acc,none"] == want["acc,none"] and got["acc_norm,none"] == want["acc_norm,none"]


def test_run_eval_returns_zero_shot(tmp_path):
    out = tmp_path / "res.json"
    cfg = GlobeConfig.from_dict({"model": {"path": str(fixture_path())}, "output": str(out),
                                 "eval": {"tasks": [TASK], "task_paths": [str(TASKS)], "task_limit": 8,
                                          "task_batch_size": 4, "device": "cpu", "dtype": "fp32"}})
    res = run_eval(cfg)
    zs = res["zero_shot"][TASK]
    assert zs["sample_len"] == 8 and _acc(res["zero_shot"]) >= 0.5
    assert res["perplexity"] is None and res["model_kind"] == "hf" and out.is_file()


def test_unknown_task_fails_before_model_load(tmp_path):
    empty = tmp_path / "not_a_model"  # a config.json and no weights: loading it would fail, so the tasks fail first
    empty.mkdir()
    (empty / "config.json").write_text((fixture_path() / "config.json").read_text())
    cfg = GlobeConfig.from_dict({"model": {"path": str(empty)}, "output": str(tmp_path / "o.json"),
                                 "eval": {"tasks": [TASK, "nonexistent_task"], "task_paths": [str(TASKS)]}})
    with pytest.raises(GlobeError, match="unknown lm-eval task.*nonexistent_task") as e:
        run_eval(cfg)
    assert TASK not in str(e.value)  # the local task was found through task_paths
    assert not (tmp_path / "o.json").exists()
    cfg.eval.task_paths = [str(tmp_path / "missing")]
    with pytest.raises(GlobeError, match="eval.task_paths: no such directory"):
        run_eval(cfg)


def test_cli_unknown_task_one_line_exit_2(capsys):
    from globe.cli.main import main

    rc = main(["eval", f"model.path={fixture_path()}", "eval.tasks=[nonexistent_task]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: unknown lm-eval task(s): nonexistent_task")


@pytest.mark.parametrize("kw,key", [({"task_limit": 0}, "eval.task_limit"),
                                    ({"task_batch_size": 0}, "eval.task_batch_size"),
                                    ({"task_paths": [""]}, "eval.task_paths")])
def test_bad_eval_task_options(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        EvalCfg(**kw)

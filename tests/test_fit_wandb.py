"""Optional wandb logging of `run_fit`: offline run written where expected, with the metrics.jsonl scalars,
support / atom-popularity histograms, config and summary; one-line errors when wandb is missing or an online
run has no credentials. The .wandb file is read back with a small reader of its record-log format
(7-byte ':W&B' header, 32 KiB blocks of <crc32, length, type> chunks holding wandb Record protobufs)."""

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from globe.config import GlobeConfig
from globe.errors import GlobeError
from globe.io.checkpoint import Checkpoint
from globe.testing.models import save_model, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_model(tiny_model("qwen2_moe", num_experts=8), tmp_path_factory.mktemp("m") / "tiny"))


@pytest.fixture
def wb_env(monkeypatch, tmp_path):
    for k in ("WANDB_DIR", "WANDB_MODE", "WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wbconfig"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wbcache"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    return monkeypatch


def cfg_for(model_dir, out, **wandb):
    return GlobeConfig.from_dict({
        "model": {"path": model_dir}, "output_dir": str(out), "bank": {"m_up": 6, "m_gate": 6, "r": 8},
        "sparsity": {"target_support": 3},
        "train": {"steps": 8, "batch_size": 8, "checkpoint_every": 4, "eval_every": 4, "log_every": 2,
                  "baselines": False},
        "wandb": {"enabled": True, "mode": "offline", "project": "globe-test", "run_name": "tiny", "tags": ["t"],
                  **wandb}})


def run(cfg):
    from globe.fit.run import run_fit
    return run_fit(cfg, progress=False)


def records(path: Path) -> list:
    """All Record protobufs of a .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block tail padding
            pos += block - pos % block
            continue
        _, n, typ = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):  # still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if typ == 1:
            out.append(chunk)
        elif typ == 2:
            buf = chunk
        elif typ == 3:
            buf += chunk
        elif typ == 4:
            out.append(buf + chunk)
        elif typ == 0 and n == 0:
            break
    return [pb.Record.FromString(b) for b in out]


def finished_records(path: Path, timeout: float = 30.0) -> list:
    """Records once the exit record is on disk: wandb-core writes the file asynchronously and
    run.finish() can return before it is flushed (it is complete at process exit)."""
    t0 = time.time()
    while True:
        recs = records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.time() - t0 > timeout:
            return recs
        time.sleep(0.1)


def history(recs) -> list[dict]:
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            row: dict = {}
            for it in r.history.item:  # media such as histograms come as nested keys (name, field)
                path = [it.key] if it.key else list(it.nested_key)
                d = row
                for k in path[:-1]:
                    d = d.setdefault(k, {})
                d[path[-1]] = json.loads(it.value_json)
            rows.append(row)
    assert rows
    return rows


def one_run_dir(root: Path) -> Path:
    runs = list(root.glob("wandb/offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_offline_run_logs_metrics_histograms_config(model_dir, tmp_path, wb_env):
    pytest.importorskip("wandb")
    out = tmp_path / "o"
    summ = run(cfg_for(model_dir, out))
    rd = one_run_dir(out / ".globe_fit")  # default: inside output_dir, nothing else added to output_dir
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".globe_fit", "globe-gate.safetensors", "globe-up.safetensors", "globe.safetensors.index.json",
         "globe_config.json", "metrics.jsonl", "summary.json"])
    wf = list(rd.glob("run-*.wandb"))
    assert len(wf) == 1 and wf[0].stat().st_size > 0
    recs = finished_records(wf[0])
    kinds = {r.WhichOneof("record_type") for r in recs}
    assert {"run", "history", "exit"} <= kinds
    exit_rec = [r for r in recs if r.WhichOneof("record_type") == "exit"][-1]
    assert exit_rec.exit.exit_code == 0
    run_rec = [r for r in recs if r.WhichOneof("record_type") == "run"][0].run
    assert run_rec.project == "globe-test" and run_rec.display_name == "tiny" and list(run_rec.tags) == ["t"]
    conf = {it.key: json.loads(it.value_json) for it in run_rec.config.update}
    assert conf["bank"]["m_up"] == 6 and conf["train"]["steps"] == 8 and conf["wandb"]["mode"] == "offline"

    rows = history(recs)
    ck = Checkpoint(model_dir)
    N = len(ck.moe_layers) * ck.num_experts
    jl = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for fam in ("up", "gate"):
        # every metrics.jsonl record appears with the same values under the family prefix
        mine = [r for r in jl if r["family"] == fam]
        logged = [r for r in rows if f"{fam}/loss" in r]
        assert len(logged) == len(mine) > 0
        for a, b in zip(mine, logged):
            for k in ("step", "loss", "rel_error", "support_median", "support_p95", "temperature", "step_time"):
                assert b[f"{fam}/{k}"] == pytest.approx(a[k])
        # histograms at each evaluation (steps 4, 8) and for the final pruned codes
        hist = [r for r in rows if f"{fam}/support_size" in r]
        assert [r[f"{fam}/step"] for r in hist] == [4, 8]
        for r in hist:
            h = r[f"{fam}/support_size"]
            assert h["_type"] == "histogram" and sum(h["values"]) == N  # every expert counted once
            pop = r[f"{fam}/atom_popularity"]
            assert len(pop["values"]) == 6  # one bin per atom
            # popularity counts sum to the total support
            assert sum(pop["values"]) == sum(i * c for i, c in enumerate(h["values"]))
        fin = [r for r in rows if f"{fam}/final/support_size" in r]
        assert len(fin) == 1
        assert fin[0][f"{fam}/final/rel_fro_error"] == pytest.approx(summ["families"][fam]["rel_fro_error"])
        med = summ["families"][fam]["median_support"]
        assert fin[0][f"{fam}/final/support_size"]["values"][int(med)] > 0
    summary = {it.key or it.nested_key[0]: it.value_json
               for r in recs if r.WhichOneof("record_type") == "summary" for it in r.summary.update}
    assert "up/final/support_size" in summary and "gate/atom_popularity" in summary
    summary = {k: json.loads(v) for k, v in summary.items() if k.startswith("summary/")}
    assert summary["summary/families/up/rel_fro_error"] == pytest.approx(summ["families"]["up"]["rel_fro_error"])


def test_wandb_dir_env_and_finish_on_error(model_dir, tmp_path, wb_env, monkeypatch):
    pytest.importorskip("wandb")
    import globe.fit.run as fr
    wb_env.setenv("WANDB_DIR", str(tmp_path / "wbdir"))

    def boom(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(fr, "_baselines", boom)
    cfg = cfg_for(model_dir, tmp_path / "o")
    cfg.train.baselines, cfg.train.families = True, ["up"]  # fails right after the up family
    with pytest.raises(RuntimeError, match="boom"):
        run(cfg)
    rd = one_run_dir(tmp_path / "wbdir")
    assert not (tmp_path / "o" / ".globe_fit" / "wandb").exists()
    recs = finished_records(next(rd.glob("run-*.wandb")))
    exits = [r.exit.exit_code for r in recs if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]  # the run was finished, marked failed
    assert any("up/loss" in r for r in history(recs))


def test_missing_wandb_is_one_line_error(model_dir, tmp_path, wb_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "o"
    with pytest.raises(GlobeError) as e:
        run(cfg_for(model_dir, out))
    msg = str(e.value)
    assert "wandb" in msg and "not installed" in msg and "\n" not in msg
    assert not out.exists()  # refused before any work
    # disabled (or not enabled) never imports it
    cfg = cfg_for(model_dir, out, mode="disabled")
    cfg.train.families = ["up"]
    assert "up" in run(cfg)["families"]


def test_online_without_credentials_never_prompts(model_dir, tmp_path, wb_env):
    pytest.importorskip("wandb")
    out = tmp_path / "o"
    with pytest.raises(GlobeError, match="credentials") as e:
        run(cfg_for(model_dir, out, mode="online"))
    assert "\n" not in str(e.value)
    assert not out.exists()

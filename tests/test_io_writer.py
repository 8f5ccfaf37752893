"""Streaming sharded writer (read back by the safetensors library) and output-location checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from globe.errors import GlobeError
from globe.io.outputs import check_file_writable, check_writable, staging_dir
from globe.io.writer import ShardedWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
            "c": torch.arange(10, dtype=torch.int64).reshape(2, 5), "s": torch.tensor(3.0),
            "e": torch.zeros(0, 4)}


@pytest.mark.parametrize("shard", [10**9, 64])
def test_roundtrip_single_and_sharded(tmp_path, shard):
    ts = _tensors()
    with ShardedWriter(tmp_path, [(k, v.dtype, v.shape) for k, v in ts.items()], prefix="x",
                       max_shard_bytes=shard, metadata={"k": "v"}) as w:
        w.write_rows("a", 3, ts["a"][3:])  # out of order, in row ranges
        w.write_rows("a", 0, ts["a"][:3])
        for k in "bcse":
            w.write(k, ts[k])
        wm = w.close()
    files = sorted(set(wm.values()))
    if shard == 10**9:
        assert files == ["x.safetensors"] and not (tmp_path / "x.safetensors.index.json").exists()
    else:
        assert len(files) > 1
        idx = json.loads((tmp_path / "x.safetensors.index.json").read_text())
        assert idx["weight_map"] == wm
        assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    got = {}
    for f in files:
        got.update(load_file(str(tmp_path / f)))  # the safetensors library validates the layout
    assert set(got) == set(ts)
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)


def test_incomplete_or_wrong_writes_refused(tmp_path):
    plan = [("a", torch.float32, (4, 2)), ("b", torch.float32, (3,))]
    w = ShardedWriter(tmp_path, plan)
    w.write("b", torch.ones(3))
    w.write_rows("a", 0, torch.ones(2, 2))
    with pytest.raises(GlobeError, match="shape"):
        w.write("b", torch.ones(4))
    with pytest.raises(GlobeError, match="dtype"):
        w.write("b", torch.ones(3, dtype=torch.float64))
    with pytest.raises(GlobeError, match="do not fit"):
        w.write_rows("a", 3, torch.ones(2, 2))
    with pytest.raises(GlobeError, match="incompletely written"):
        w.close()
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    with pytest.raises(GlobeError, match="cannot be written"):
        check_writable("/proc/globe-test-out")
    with pytest.raises(GlobeError, match="not enough disk space"):
        check_writable(tmp_path, need_bytes=10**18)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(GlobeError, match="is a file"):
        check_writable(f / "sub")
    with pytest.raises(GlobeError, match="does not exist"):
        check_file_writable(tmp_path / "missing" / "out.json")


def test_staging_dir_renames_or_removes(tmp_path):
    out = tmp_path / "out"
    with staging_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x"
    out2 = tmp_path / "out2"
    with pytest.raises(RuntimeError), staging_dir(out2) as tmp:
        (tmp / "f").write_text("x")
        raise RuntimeError("boom")
    assert not out2.exists() and [p.name for p in tmp_path.iterdir()] == ["out"]

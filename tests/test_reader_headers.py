"""Fuzzed safetensors headers: globe reads exactly what the safetensors library reads, or refuses.

Each mutation of a valid tiny checkpoint's header (offsets, dtypes, shapes, header length, JSON,
metadata, file length) is given to the library (`safetensors.torch.load_file`) and to globe:
  - format level (STFile): accepted iff the library accepts (globe may refuse only the packed MX
    dtypes torch cannot hold), and then every tensor is bit-identical with the same dtype and shape;
  - checkpoint level (Checkpoint + `globe inspect`): a file the library refuses is refused with one
    line (exit 2); whatever globe accepts reads exactly what the library reads.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from globe.cli.main import main
from globe.errors import GlobeError
from globe.io.checkpoint import Checkpoint
from globe.io.stfile import SafetensorsFormatError, STFile


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _pack(header: dict | str | bytes, data: bytes, n: int | None = None) -> bytes:
    hb = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(hb) if n is None else n) + hb + data


def mutations(header: dict, data: bytes) -> list[tuple[str, bytes]]:
    """(label, file bytes) for every mutation."""
    meta = header.get("__metadata__")
    tensors = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    names = [k for k, _ in tensors]
    picks = sorted({names[0], names[1], names[len(names) // 2], names[-1]}, key=names.index)
    out: list[tuple[str, bytes]] = []

    def put(label: str, edit) -> None:
        h = json.loads(json.dumps(header))
        edit(h)
        out.append((label, _pack(h, data)))

    def set_(name, key, val):
        return lambda h: h[name].__setitem__(key, val)

    size = len(data)
    for nm in picks:
        b, e = header[nm]["data_offsets"]
        shape, dt = header[nm]["shape"], header[nm]["dtype"]
        i = names.index(nm)
        prev_b = header[names[i - 1]]["data_offsets"][0] if i else 0
        for lab, offs in [("neg begin", [-1, e]), ("neg end", [b, -8]), ("begin+1", [b + 1, e]), ("end+1", [b, e + 1]),
                          ("end-1", [b, e - 1]), ("overlap prev", [prev_b, e]), ("past file", [b, size + 4]),
                          ("end<begin", [e, b]), ("three", [b, e, e]), ("float", [float(b), e]), ("str", [str(b), e]),
                          ("bool", [False, e] if b == 0 else [True, e]), ("huge", [b, 2**64]), ("one", [b])]:
            put(f"{nm} offsets {lab}", set_(nm, "data_offsets", offs))
        for code in ["F32", "F16", "BF16", "I32", "I64", "U8", "I8", "BOOL", "U16", "U32", "F64", "C64", "F8_E4M3",
                     "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F7", "f32", 5, None]:
            put(f"{nm} dtype {code}", set_(nm, "dtype", code))
            width = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1, "BOOL": 1, "U16": 2,
                     "U32": 4, "F64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}.get(code)
            if width and shape and (shape[-1] * 4) % width == 0 and dt == "F32":
                put(f"{nm} dtype {code} same bytes", lambda h, nm=nm, code=code, w=width, sh=shape: h[nm].update(
                    dtype=code, shape=[*sh[:-1], sh[-1] * 4 // w]))
        for lab, shp in [("+1", [*shape[:-1], shape[-1] + 1] if shape else [1]), ("empty", []), ("zero", [0]),
                         ("neg", [-1] + shape[1:]), ("float", [s + 0.5 for s in shape] or [0.5]),
                         ("str", "x"), ("transposed", shape[::-1]), ("flat", [max(1, (e - b) // 4)]),
                         ("extra 1", [1, *shape]), ("huge", [2**40, 2**40, 2**40])]:
            put(f"{nm} shape {lab}", set_(nm, "shape", shp))
        put(f"{nm} missing dtype", lambda h, nm=nm: h[nm].pop("dtype"))
        put(f"{nm} missing shape", lambda h, nm=nm: h[nm].pop("shape"))
        put(f"{nm} extra field", lambda h, nm=nm: h[nm].update(extra=[1, 2]))
        put(f"{nm} removed", lambda h, nm=nm: h.pop(nm))
        put(f"{nm} not an object", lambda h, nm=nm: h.__setitem__(nm, [1, 2]))
    a, b_ = names[1], names[2]
    if header[a]["data_offsets"][1] - header[a]["data_offsets"][0] == \
            header[b_]["data_offsets"][1] - header[b_]["data_offsets"][0] and header[a]["shape"] == header[b_]["shape"]:
        put("swap same-size offsets", lambda h: (h[a].__setitem__("data_offsets", header[b_]["data_offsets"]),
                                                 h[b_].__setitem__("data_offsets", header[a]["data_offsets"])))
    put("extra empty tensor at end", lambda h: h.__setitem__("zz.empty", {"dtype": "F32", "shape": [0],
                                                                          "data_offsets": [size, size]}))
    put("extra tensor past end", lambda h: h.__setitem__("zz.more", {"dtype": "F32", "shape": [1],
                                                                     "data_offsets": [size, size + 4]}))
    for lab, m in [("null", None), ("ints", {"a": 1}), ("list", ["pt"]), ("nested", {"a": {"b": "c"}}),
                   ("strings", {"format": "pt", "x": "y"})]:
        put(f"metadata {lab}", lambda h, m=m: h.__setitem__("__metadata__", m))
    js = json.dumps(header)
    n = len(js.encode())
    out += [("header len -1", _pack(js, data, n - 1)), ("header len +1", _pack(js, data, n + 1)),
            ("header len 0", _pack(js, data, 0)), ("header len 2^63", _pack(js, data, 2**63)),
            ("header len = file", _pack(js, data, n + 8 + len(data))), ("file 7 bytes", b"\x00" * 7),
            ("trailing byte", _pack(js, data + b"\x00")), ("data -1 byte", _pack(js, data[:-1])),
            ("data empty", _pack(js, b"")), ("padded header", _pack(js + "        ", data)),
            ("leading space", _pack(" " + js, data)), ("json list", _pack("[" + js + "]", data)),
            ("json trailing comma", _pack(js[:-1] + ",}", data)), ("json cut", _pack(js[:-1] + " ", data)),
            ("json garbage after", _pack(js + "x", data)), ("json NaN", _pack(js[:-1] + ', "x": NaN}', data)),
            ("json bad utf8", _pack(js.encode()[:-1] + b"\xff}", data)),
            ("json duplicate key", _pack(js[:-1] + f', "{names[0]}": ' + json.dumps(header[names[0]]) + "}", data)),
            ("json deep", _pack("[" * 5000 + "]" * 5000, data)), ("empty header", _pack("{}", data)),
            ("empty file header", _pack("{}", b"")), ("null header", _pack("null", data))]
    del meta
    return out


def _lib(path: Path):
    try:
        return load_file(str(path))
    except Exception:
        return None


def _same(ours: dict[str, torch.Tensor], lib: dict[str, torch.Tensor]) -> bool:
    return ours.keys() == lib.keys() and all(
        ours[k].dtype == lib[k].dtype and ours[k].shape == lib[k].shape
        and torch.equal(ours[k].view(torch.uint8) if ours[k].numel() else ours[k],
                        lib[k].view(torch.uint8) if lib[k].numel() else lib[k]) for k in lib)


@pytest.fixture(scope="module")
def cases(tiny_dirs):
    src = tiny_dirs["qwen2_moe"][1]
    header, data = _split(src / "model.safetensors")
    return src, mutations(header, data)


def test_format_level_matches_library(cases, tmp_path):
    _, muts = cases
    f = tmp_path / "x.safetensors"
    agree_ok = agree_refused = 0
    for label, raw in muts:
        f.write_bytes(raw)
        lib = _lib(f)
        try:
            st = STFile(f)
            ours = {k: st.read(k) for k in st.keys()}
        except SafetensorsFormatError as e:
            ours, msg = None, str(e)
            assert "\n" not in msg, label
        if lib is None:
            assert ours is None, f"{label}: library refuses, globe read it"
            agree_refused += 1
        elif ours is None:
            assert "cannot read" in msg and any(c in label for c in ("F4", "F6")), f"{label}: globe refused: {msg}"
        else:
            assert _same(ours, lib), f"{label}: globe read other values than the library"
            agree_ok += 1
    assert agree_ok >= 15 and agree_refused >= 100, (agree_ok, agree_refused)


def test_checkpoint_and_cli_level(cases, tmp_path, capsys):
    src, muts = cases
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    accepted = refused = 0
    for label, raw in muts:
        (d / "model.safetensors").write_bytes(raw)
        lib = _lib(d / "model.safetensors")
        try:
            ck = Checkpoint(d)
            ours = {k: ck.tensor(k) for k in ck.keys()}
        except GlobeError as e:
            assert "\n" not in str(e), label
            ours = None
        if ours is None:
            refused += 1
            if lib is None or refused % 5 == 0:  # the CLI on every library refusal and some of ours
                rc = main(["inspect", str(d)])
                err = capsys.readouterr().err.strip()
                assert rc == 2 and err.startswith("error:") and "\n" not in err, label
        else:
            assert lib is not None and _same(ours, lib), label
            accepted += 1
    assert accepted >= 5 and refused >= 100, (accepted, refused)


def test_every_shard_is_validated(tmp_path):
    """A bad header in the second shard of an index is refused at open, before any weight is read."""
    from globe.testing.models import tiny_model

    m = tiny_model("olmoe")
    m.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3
    victim = shards[-1]
    header, data = _split(victim)
    name = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[-1]
    header[name]["data_offsets"][1] += 4  # runs past the file
    victim.write_bytes(_pack(header, data))
    with pytest.raises(GlobeError, match=rf"corrupt or truncated safetensors file .*{victim.name}.*{name}"):
        Checkpoint(tmp_path)


def test_issue_examples_negative_and_overlapping_offsets(tiny_dirs, tmp_path, capsys):
    """Issue 9, kind 1: negative and overlapping data_offsets were accepted and read as weights."""
    src = tiny_dirs["qwen2_moe"][1]
    header, data = _split(src / "model.safetensors")
    up = "model.layers.0.mlp.experts.0.up_proj.weight"
    gate = "model.layers.0.mlp.experts.0.gate_proj.weight"
    for label, edit in [("negative", lambda h: h[up].__setitem__("data_offsets", [-64, h[up]["data_offsets"][1]])),
                        ("overlap", lambda h: h[up].__setitem__("data_offsets", h[gate]["data_offsets"]))]:
        h = json.loads(json.dumps(header))
        edit(h)
        d = tmp_path / label
        shutil.copytree(src, d)
        (d / "model.safetensors").write_bytes(_pack(h, data))
        assert _lib(d / "model.safetensors") is None
        rc = main(["inspect", str(d)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "corrupt or truncated safetensors file" in err and "\n" not in err, err
        assert up in err or "library" in err
        out = tmp_path / f"fit-{label}"  # fit used to read these bytes as weights
        assert main(["fit", f"model.path={d}", f"output_dir={out}", "train.steps=2"]) == 2 and not out.exists()
        assert "corrupt or truncated safetensors file" in capsys.readouterr().err

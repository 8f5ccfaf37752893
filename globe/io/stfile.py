"""Minimal safetensors reader with explicit reads (pread), no memory map; headers validated in full.

Why not `safe_open` for the reads: it memory-maps the whole shard, so how much of a multi-GB shard
counts as resident depends on the OS and the safetensors version. Reading each tensor's byte range
into a fresh buffer keeps peak memory at about one tensor by construction, and reading one fused
expert (a row range of (E, 2p, d)) never touches its neighbours. benchmarks/bench_reader.py measures
both.

The format: 8-byte little-endian header length n, n bytes of UTF-8 JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data block.
Validation (`STFile.__init__`) is exactly the safetensors library's `read_metadata`
(safetensors/src/tensor.rs, `Metadata::validate`), replicated here so that each refusal names the
tensor, and then confirmed by the installed library itself (`safe_open`, which reads the header
only): n <= 100 MB and within the file; valid UTF-8 JSON object; `__metadata__` null or str -> str;
every entry has a known dtype, a shape of unsigned ints and two unsigned data_offsets; sorted by
offsets, the tensors tile the data block from 0 with no gap or overlap, each range is exactly
prod(shape) x dtype width bytes, and the data block ends exactly at the end of the file. A file
the library accepts but whose dtype torch cannot hold element-wise (F4, F6_*: packed MX formats)
is refused here with the tensor's name.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

MAX_HEADER = 100_000_000  # safetensors' MAX_HEADER_SIZE
U64 = 2**64 - 1
# safetensors dtype code -> element width in bits (tensor.rs Dtype::bitsize)
BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
_TORCH = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
# code -> (torch dtype, bytes per element), for the codes this torch can hold element-wise
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    k: (getattr(torch, v), BITS[k] // 8) for k, v in _TORCH.items() if hasattr(torch, v)}


class SafetensorsFormatError(ValueError):
    pass


def _uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= U64


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_header(raw: bytes, size: int) -> tuple[dict[str, dict], dict | None]:
    """(tensors {name: {dtype, shape, data_offsets}}, metadata) from the n header bytes of a file of
    `size` bytes, validated as safetensors' `read_metadata` does. Raises SafetensorsFormatError."""
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise SafetensorsFormatError("header is not valid UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise SafetensorsFormatError(f"header is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise SafetensorsFormatError("header __metadata__ is not a map of strings")
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise SafetensorsFormatError(f"header entry {name!r} lacks dtype, shape or data_offsets")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in BITS:
            raise SafetensorsFormatError(f"tensor {name}: unknown dtype {dt!r}")
        if not isinstance(shape, list) or not all(_uint(s) for s in shape):
            raise SafetensorsFormatError(f"tensor {name}: shape {shape!r} is not a list of unsigned integers")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_uint(o) for o in offs):
            raise SafetensorsFormatError(f"tensor {name}: data_offsets {offs!r} is not two unsigned integers")
    start = 0
    for name, info in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        b, e = info["data_offsets"]
        if b != start or e < b:
            what = ("overlaps the previous tensor" if b < start else "leaves a gap" if b > start
                    else "ends before it begins")
            raise SafetensorsFormatError(f"tensor {name}: data_offsets [{b}, {e}] {what} (expected begin {start})")
        start = e
        nbits = math.prod(info["shape"]) * BITS[info["dtype"]]
        if nbits > U64:
            raise SafetensorsFormatError(f"tensor {name}: shape {info['shape']} overflows")
        if nbits % 8:
            raise SafetensorsFormatError(f"tensor {name}: shape {info['shape']} is not a whole number of bytes")
        if e - b != nbits // 8:
            raise SafetensorsFormatError(f"tensor {name}: byte range {e - b} does not match shape {info['shape']} "
                                         f"of {info['dtype']} ({nbits // 8} bytes)")
    n = len(raw)
    if 8 + n + start != size:
        raise SafetensorsFormatError(f"data ends at byte {8 + n + start} but the file has {size} bytes")
    return header, meta


def _library_check(path: Path) -> None:
    """The installed safetensors library's own validation of the header (no tensor data is touched)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception as e:  # SafetensorError and friends: one line for the user
        raise SafetensorsFormatError(f"rejected by the safetensors library: {str(e).splitlines()[0]}") from None


class STFile:
    """One safetensors file: header parsed and validated eagerly (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsFormatError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise SafetensorsFormatError(f"header length {n} exceeds the 100 MB limit")
            if n > size - 8:
                raise SafetensorsFormatError(f"header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
        self.header, self.metadata = parse_header(raw, size)
        _library_check(self.path)
        for name, info in self.header.items():
            if info["dtype"] not in DTYPES:
                raise SafetensorsFormatError(f"tensor {name} has dtype {info['dtype']}, which globe cannot read "
                                             "(packed MX formats are not supported)")
        self.base = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype_str(self, name: str) -> str:
        return self.header[name]["dtype"]

    def read(self, name: str, rows: slice | int | None = None, merge: int = 1) -> torch.Tensor:
        """The tensor, or a contiguous range of its first dimension (`rows`), in its stored dtype.

        merge=k first views the leading k dimensions as one, so rows can address e.g. the gate half
        (E, 2p, d) -> (E*2p, d) of one fused expert without reading the other half.
        """
        info = self.header[name]
        dt, width = DTYPES[info["dtype"]]
        shape = list(info["shape"])
        if merge > 1:
            shape = [math.prod(shape[:merge]), *shape[merge:]]
        b, e = info["data_offsets"]
        squeeze = isinstance(rows, int)
        if rows is not None:
            if not shape:
                raise SafetensorsFormatError(f"{name} is a scalar; cannot slice")
            if squeeze:
                rows = slice(rows, rows + 1)
            lo, hi, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("only contiguous row ranges are supported")
            row_bytes = (e - b) // max(shape[0], 1)
            b, e = b + lo * row_bytes, b + hi * row_bytes
            shape[0] = hi - lo
        buf = bytearray(e - b)
        if buf:
            with open(self.path, "rb", buffering=0) as f:
                got = f.readinto(memoryview(buf)) if f.seek(self.base + b) >= 0 else 0
            if got != len(buf):
                raise SafetensorsFormatError(f"{name}: short read ({got} of {len(buf)} bytes)")
        t = torch.frombuffer(buf, dtype=dt) if buf else torch.empty(0, dtype=dt)
        t = t.reshape(shape)
        return t[0] if squeeze else t

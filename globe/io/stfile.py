"""Minimal safetensors reader with explicit reads (pread), no memory map.

Why not `safe_open`: it memory-maps the whole shard, so how much of a multi-GB shard counts as
resident depends on the OS and the safetensors version. Reading each tensor's byte range into a
fresh buffer keeps peak memory at about one tensor by construction, and reading one fused expert
(a row range of (E, 2p, d)) never touches its neighbours. benchmarks/bench_reader.py measures both.
The format is simple: 8-byte little-endian header length, JSON header
{name: {dtype, shape, data_offsets: [begin, end]}}, then the data block.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = (getattr(torch, _attr), 1)


class SafetensorsFormatError(ValueError):
    pass


class STFile:
    """One safetensors file: header parsed eagerly and checked against the file size."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsFormatError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise SafetensorsFormatError(f"header length {n} exceeds file size {size}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsFormatError(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsFormatError("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None)
        self.base = 8 + n
        self.header: dict[str, dict] = header
        end = 0
        for name, info in header.items():
            try:
                dt, width = DTYPES[info["dtype"]]
                b, e = info["data_offsets"]
                shape = info["shape"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsFormatError(f"bad header entry for {name}") from None
            if e - b != math.prod(shape) * width:
                raise SafetensorsFormatError(f"{name}: byte range does not match shape {shape}")
            end = max(end, e)
        if self.base + end > size:
            raise SafetensorsFormatError(f"data ends at byte {self.base + end} but the file has {size} bytes")

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

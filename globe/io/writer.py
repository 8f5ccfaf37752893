"""Streaming, sharded safetensors writer: one tensor (or a row range of one) in memory at a time.

Why our own writer: `safetensors.torch.save_file` needs every tensor of a file in memory at once, so
writing a 5 GB shard costs 5 GB of RAM; the full-size export must stay under 4 GB. The format is
simple (8-byte little-endian header length, JSON header, contiguous data), so the writer lays the
whole shard out from a plan of (name, dtype, shape) known up front, writes the header, then writes
each tensor's bytes at its offset with `os.pwrite` as soon as it is computed, in any order and, for
large tensors, row range by row range. Files are read back and validated by the safetensors library
in the tests; `close()` refuses to finish if any byte of any tensor was never written.

Output follows Hugging Face conventions: one file `{prefix}.safetensors` when everything fits in one
shard, else `{prefix}-00001-of-0000N.safetensors` ... plus `{prefix}.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {name: file}}).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GlobeError

ST_DTYPES: dict[torch.dtype, tuple[str, int]] = {
    torch.float64: ("F64", 8), torch.float32: ("F32", 4), torch.float16: ("F16", 2), torch.bfloat16: ("BF16", 2),
    torch.int64: ("I64", 8), torch.int32: ("I32", 4), torch.int16: ("I16", 2), torch.int8: ("I8", 1),
    torch.uint8: ("U8", 1), torch.bool: ("BOOL", 1),
}
for _attr, _name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _attr):
        ST_DTYPES[getattr(torch, _attr)] = (_name, 1)

DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's usual shard size


@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: int = 0
    begin: int = 0  # within the file's data section
    nbytes: int = 0
    written: int = 0


def tensor_bytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * ST_DTYPES[dtype][1]


class ShardedWriter:
    """Write the tensors of `plan` [(name, dtype, shape), ...] into `out_dir` as `prefix` shards.

    write(name, t) writes a whole tensor; write_rows(name, start, t) writes rows [start, start+len(t))
    of its first dimension. Shapes and dtypes must match the plan exactly. close() checks completeness,
    writes the index (when sharded) and returns {name: file}. Use as a context manager; on error the
    partly written files are removed.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 prefix: str = "model", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        self.dir = Path(out_dir)
        self.prefix = prefix
        self.entries: dict[str, _Entry] = {}
        shards: list[list[_Entry]] = [[]]
        size = 0
        for name, dtype, shape in plan:
            if name in self.entries:
                raise GlobeError(f"writer: tensor {name} planned twice")
            if dtype not in ST_DTYPES:
                raise GlobeError(f"writer: dtype {dtype} of {name} has no safetensors code")
            e = _Entry(name, dtype, tuple(int(s) for s in shape))
            e.nbytes = tensor_bytes(dtype, e.shape)
            if shards[-1] and size + e.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            e.file, e.begin = len(shards) - 1, size
            size += e.nbytes
            shards[-1].append(e)
            self.entries[name] = e
        n = len(shards)
        self.files = [f"{prefix}.safetensors"] if n == 1 else \
            [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._fds: list[int] = []
        self._base: list[int] = []
        meta = {"format": "pt", **(metadata or {})}
        try:
            for i, entries in enumerate(shards):
                header: dict[str, object] = {"__metadata__": meta}
                for e in entries:
                    header[e.name] = {"dtype": ST_DTYPES[e.dtype][0], "shape": list(e.shape),
                                      "data_offsets": [e.begin, e.begin + e.nbytes]}
                raw = json.dumps(header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as safetensors does
                path = self.dir / self.files[i]
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                os.write(fd, len(raw).to_bytes(8, "little") + raw)
                self._base.append(8 + len(raw))
                data = sum(e.nbytes for e in entries)
                os.ftruncate(fd, 8 + len(raw) + data)
        except BaseException:
            self.abort()
            raise

    # ---- writing -------------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise GlobeError(f"writer: tensor {name} is not in the plan") from None

    def write(self, name: str, t: torch.Tensor) -> None:
        e = self._entry(name)
        if tuple(t.shape) != e.shape:
            raise GlobeError(f"writer: {name} has shape {list(t.shape)}, planned {list(e.shape)}")
        self._put(e, 0, t)

    def write_rows(self, name: str, start: int, t: torch.Tensor) -> None:
        e = self._entry(name)
        if not e.shape or tuple(t.shape[1:]) != e.shape[1:] or start < 0 or start + t.shape[0] > e.shape[0]:
            raise GlobeError(f"writer: rows [{start}, {start + t.shape[0]}) of {name} {list(t.shape)} do not fit "
                             f"the planned shape {list(e.shape)}")
        row = e.nbytes // max(e.shape[0], 1)
        self._put(e, start * row, t)

    def _put(self, e: _Entry, off: int, t: torch.Tensor) -> None:
        if t.dtype != e.dtype:
            raise GlobeError(f"writer: {e.name} has dtype {t.dtype}, planned {e.dtype}")
        buf = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        mv = memoryview(buf)
        pos = self._base[e.file] + e.begin + off
        fd = self._fds[e.file]
        done = 0
        while done < len(mv):
            done += os.pwrite(fd, mv[done:], pos + done)
        e.written += len(mv)

    # ---- finishing -----------------------------------------------------------------------------
    def close(self) -> dict[str, str]:
        """Check that every planned byte was written, fsync, write the index; returns {name: file}."""
        short = [e.name for e in self.entries.values() if e.written != e.nbytes]
        if short:
            self.abort()
            raise GlobeError(f"writer: {len(short)} tensor(s) incompletely written, e.g. {short[0]}")
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        wm = {e.name: self.files[e.file] for e in self.entries.values()}
        if len(self.files) > 1:
            total = sum(e.nbytes for e in self.entries.values())
            idx = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))}
            (self.dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(idx, indent=2) + "\n")
        return wm

    def abort(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        for f in getattr(self, "files", []):
            try:
                (self.dir / f).unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is not None:
            self.abort()

"""Named tensors read lazily from a directory of safetensors files (one file, or an index + shards).

Why: the fit's artifacts, a globe export and the runtime's loader all read tensors by name, one at a
time, from files that may be larger than memory. `TensorDir` resolves `{prefix}.safetensors` or
`{prefix}.safetensors.index.json` + shards, validates every header up front (through `STFile`) and
reads each tensor with explicit reads (see `globe/io/stfile.py`), so peak memory is one tensor.
`DictSource` is the in-memory twin (tests, random artifacts, converted old formats).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import GlobeError
from .stfile import DTYPES, SafetensorsFormatError, STFile


class DictSource:
    """Tensors held in a dict: the same read API as TensorDir."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def tensor(self, name: str) -> torch.Tensor:
        return self._get(name)

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GlobeError(f"tensor {name} not found") from None


class TensorDir:
    """`{prefix}.safetensors` or `{prefix}.safetensors.index.json` + shards in `path`."""

    def __init__(self, path: str | os.PathLike, prefix: str):
        self.dir = Path(path)
        self.prefix = prefix
        self._handles: dict[str, STFile] = {}
        idx = self.dir / f"{prefix}.safetensors.index.json"
        single = self.dir / f"{prefix}.safetensors"
        if idx.is_file():
            try:
                wm = json.loads(idx.read_text())["weight_map"]
                if not isinstance(wm, dict) or not all(isinstance(f, str) for f in wm.values()):
                    raise TypeError("weight_map is not a map of tensor -> file")
            except KeyError:
                raise GlobeError(f"corrupt {idx}: no \"weight_map\" (tensor -> shard file)") from None
            except (json.JSONDecodeError, TypeError) as e:
                raise GlobeError(f"corrupt {idx}: {e}") from None
            from .checkpoint import check_shard_names

            check_shard_names(wm.values(), idx)
            self.weight_map: dict[str, str] = dict(wm)
            for f in sorted(set(self.weight_map.values())):
                have = set(self._open(f).keys())
                listed = {k for k, v in self.weight_map.items() if v == f}
                if listed - have:
                    raise GlobeError(f"{self.dir}: tensor {sorted(listed - have)[0]} is listed in {idx.name} "
                                     f"but absent from {f}")
                if have - listed:
                    raise GlobeError(f"{self.dir}: tensor {sorted(have - listed)[0]} is in {f} but "
                                     f"{idx.name} does not list it there")
        elif single.is_file():
            self.weight_map = dict.fromkeys(self._open(single.name).keys(), single.name)
        else:
            raise GlobeError(f"{self.dir}: no {prefix}.safetensors or {prefix}.safetensors.index.json")

    def _open(self, fname: str) -> STFile:
        h = self._handles.get(fname)
        if h is None:
            path = self.dir / fname
            if not path.is_file():
                raise GlobeError(f"{self.dir}: missing file {fname}")
            try:
                h = STFile(path)
            except (SafetensorsFormatError, OSError) as e:
                raise GlobeError(f"corrupt or truncated safetensors file {path}: {str(e).splitlines()[0]}") from None
            self._handles[fname] = h
        return h

    @property
    def files(self) -> list[Path]:
        return [self.dir / f for f in sorted(set(self.weight_map.values()))]

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str) -> STFile:
        try:
            return self._open(self.weight_map[name])
        except KeyError:
            raise GlobeError(f"{self.dir}: tensor {name} not found") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._file(name).dtype_str(name)][0]

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._file(name).read(name)
        except (SafetensorsFormatError, OSError) as e:
            raise GlobeError(f"cannot read tensor {name} from {self.dir}: {str(e).splitlines()[0]}") from None

"""Reading safetensors checkpoints (one file or a sharded index) lazily, whole tensors or slices.

Every header is parsed and checked up front, without touching tensor data: a header that lies about its length
or its tensors' offsets, a tensor whose bytes do not match its shape and dtype, or an index that names a missing
file or a tensor its file lacks is an error naming the tensor and the file before anything is loaded. Reads of
slices go through `safe_open(...).get_slice`, so only the requested bytes are copied, and each is logged with its
byte count (rank-local loading reports and tests what each rank read).
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from foundation.dtypes import SAFETENSORS_DTYPES, header_bits

INDEX_NAME = "model.safetensors.index.json"


def read_header(path: Path) -> tuple[dict, int]:
    """The checked JSON header of one safetensors file (tensor name -> dtype, shape, data_offsets) and the byte
    where its data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: corrupt safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, h in header.items():
        try:
            code, shape, (begin, end) = h["dtype"], [int(d) for d in h["shape"]], h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name} has a malformed header entry {h!r}") from None
        if code not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {code}, which torch cannot hold")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise ValueError(f"{path}: truncated or corrupt: tensor {name} has data offsets [{begin}, {end}), "
                             f"the file has {data_size} data bytes")
        need = math.ceil(math.prod(shape) * header_bits(code) / 8)
        if end - begin != need:
            raise ValueError(f"{path}: tensor {name} has {end - begin} bytes, its shape {shape} and dtype "
                             f"{code} need {need}")
    return header, 8 + n


@dataclass(frozen=True)
class Read:
    key: str
    index: tuple  # the part read, as (start, stop) per leading dimension; () for the whole tensor
    nbytes: int


class Checkpoint:
    """A folder of safetensors weights (single file or sharded with an index), read lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {self.folder}")
        index = self.folder / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: not a safetensors index ({err!r})") from None
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                found = sorted(p.name for p in self.folder.iterdir())
                raise FileNotFoundError(f"{self.folder} has no *.safetensors weights (tessera loads only "
                                        f"safetensors, never pickle); found {found}")
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        self.offset: dict[str, int] = {}
        self._nbytes: dict[str, int] = {}
        for fname in files:
            path = self.folder / fname
            if not path.is_file():
                named = sorted(k for k, v in weight_map.items() if v == fname)
                raise FileNotFoundError(f"{index} puts tensor(s) {named[:3]} in {fname}, which is missing")
            header, data_start = read_header(path)
            for name, h in header.items():
                if weight_map is not None and weight_map.get(name) != fname:
                    continue  # the index says another file holds it
                if name in self.file_of:
                    raise ValueError(f"tensor {name} is in both {self.file_of[name]} and {path}")
                self.file_of[name] = path
                self.shape[name] = tuple(h["shape"])
                self.dtype[name] = SAFETENSORS_DTYPES[h["dtype"]]
                begin, end = h["data_offsets"]
                self.offset[name], self._nbytes[name] = data_start + begin, end - begin
        absent = sorted(set(weight_map or ()) - set(self.file_of))
        if absent:
            raise ValueError(f"{index} puts tensor {absent[0]} in {weight_map[absent[0]]}, whose header lacks it"
                             + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
        self.names = list(self.file_of)
        self.reads: list[Read] = []
        self._handles: dict[Path, object] = {}

    def config(self) -> dict | None:
        path = self.folder / "config.json"
        return json.loads(path.read_text()) if path.exists() else None

    def nbytes(self, name: str) -> int:
        return self._nbytes[name]

    def _path(self, name: str) -> Path:
        if name not in self.file_of:
            raise KeyError(f"{self.folder}: no tensor {name!r}")
        return self.file_of[name]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Whole tensors; each file is mapped only while its tensors are copied out, so memory stays near the
        tensors asked for."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._path(n), []).append(n)
        out = {}
        for path, group in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for n in group:
                        out[n] = f.get_tensor(n)
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"{path}: cannot read tensor(s) {group[:3]}: {err}") from err
        return out

    def read_part(self, name: str, index: tuple[tuple[int, int] | None, ...] = ()) -> torch.Tensor:
        """The part of a tensor given by one `(start, stop)` (or None: all) per leading dimension, reading only
        those bytes; logged in `reads`. Files stay open until `close`."""
        path = self._path(name)
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="pt")
            handle, bounds = self._handles[path], ()
            if not index:  # get_tensor: slices of packed dtypes (F4) come out wrong
                tensor = handle.get_tensor(name)
            else:
                piece = handle.get_slice(name)
                shape = piece.get_shape()
                bounds = tuple((0, shape[d]) if span is None else span for d, span in enumerate(index))
                tensor = piece[tuple(slice(a, b) for a, b in bounds)]
        except Exception as err:
            raise ValueError(f"{path}: cannot read tensor {name} {list(index)}: {err}") from err
        self.reads.append(Read(name, bounds, tensor.numel() * tensor.element_size()))
        return tensor

    def read_into(self, out: dict[str, torch.Tensor]) -> None:
        """Copy tensors straight into preallocated CPU buffers of the same dtype and shape.

        The bytes go from the page cache into the buffer with one `readinto` per tensor at the offset the
        header gives: no memory mapping, no page faults on a fresh mapping, no intermediate tensor. Anything
        else (another dtype, a device buffer) goes through `read`."""
        fallback = []
        by_file: dict[Path, list[str]] = {}
        for n, buf in out.items():
            path = self._path(n)
            if buf.dtype == self.dtype[n] and buf.device.type == "cpu" and buf.is_contiguous():
                by_file.setdefault(path, []).append(n)
            else:
                fallback.append(n)
        for path, names in by_file.items():
            with open(path, "rb", buffering=0) as f:
                for n in sorted(names, key=self.offset.__getitem__):
                    view = memoryview(out[n].view(-1).view(torch.uint8).numpy())
                    f.seek(self.offset[n])
                    got = f.readinto(view)
                    if got != len(view):
                        raise ValueError(f"{path}: tensor {n} is truncated ({got} of {len(view)} bytes)")
        for n, t in self.read(fallback).items():
            out[n].copy_(t)

    def close(self) -> None:
        self._handles.clear()

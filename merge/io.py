"""Lazy safetensors checkpoints in, sharded safetensors out, and atomic output folders.

Reading: headers are parsed up front (shapes, dtypes, which file holds which tensor) without touching the
data; tensors are read block by block, opening each file only for that block, so the memory mapped for a
block is released before the next one and resident memory stays near the block being merged.
Writing: shards go to a temporary folder that is renamed into place only when everything succeeded, so a
failed run leaves nothing half-written.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
INDEX_NAME = "model.safetensors.index.json"


def element_size(dtype: torch.dtype) -> float:
    return 1 / 8 if dtype == torch.bool else torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file (checked against the file's length) and where data starts."""
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
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: corrupt safetensors header: {err}") from err
    header.pop("__metadata__", None)
    end = max((h["data_offsets"][1] for h in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated: tensors end at byte {8 + n + end}, file has {size} bytes")
    return header, 8 + n


class Checkpoint:
    """A Hugging Face checkpoint folder (single or sharded safetensors), read lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {self.folder}")
        index = self.folder / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {self.folder} (only safetensors checkpoints are read)")
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        self.offset: dict[str, int] = {}
        for fname in files:
            path = self.folder / fname
            if not path.exists():
                raise FileNotFoundError(f"{index} lists {fname}, which is missing")
            header, data_start = read_header(path)
            for name, h in header.items():
                if h["dtype"] not in DTYPES:
                    raise ValueError(f"{path}: tensor {name} has unsupported dtype {h['dtype']}")
                self.file_of[name] = path
                self.shape[name] = tuple(h["shape"])
                self.dtype[name] = DTYPES[h["dtype"]]
                begin, end = h["data_offsets"]
                if end - begin != element_size(self.dtype[name]) * _numel(self.shape[name]):
                    raise ValueError(f"{path}: tensor {name} has {end - begin} bytes, its shape and dtype need "
                                     f"{element_size(self.dtype[name]) * _numel(self.shape[name]):.0f}")
                self.offset[name] = data_start + begin
        self.names = list(self.file_of)

    def config(self) -> dict | None:
        path = self.folder / "config.json"
        return json.loads(path.read_text()) if path.exists() else None

    def nbytes(self, name: str) -> float:
        return element_size(self.dtype[name]) * _numel(self.shape[name])

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read some tensors; each file is mapped only while its tensors are copied out."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.file_of:
                raise KeyError(f"{self.folder}: no tensor {n!r}")
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for path, group in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for n in group:
                        out[n] = f.get_tensor(n)
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"{path}: cannot read tensor(s) {group[:3]}: {err}") from err
        return out


    def read_into(self, out: dict[str, torch.Tensor]) -> None:
        """Copy tensors straight into preallocated CPU buffers of the same dtype and shape.

        The bytes go from the page cache into the buffer with one `readinto` per tensor at the offset the
        safetensors header gives: no memory mapping, no page faults on a fresh mapping, no intermediate
        tensor. Anything else (another dtype, a device buffer) goes through `read`."""
        fallback = []
        by_file: dict[Path, list[str]] = {}
        for n, buf in out.items():
            if n not in self.file_of:
                raise KeyError(f"{self.folder}: no tensor {n!r}")
            if buf.dtype == self.dtype[n] and buf.device.type == "cpu" and buf.is_contiguous() and buf.dtype != torch.bool:
                by_file.setdefault(self.file_of[n], []).append(n)
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


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_bytes(t: torch.Tensor):
    """A zero-copy byte view for hashing (works for bfloat16, which numpy lacks)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy()


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes`, named as transformers expects."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 * 1024**3, total_bytes: int | None = None, desc: str = "write"):
        self.folder = Path(folder)
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=None, leave=False)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.total += self.pending_bytes
        self.bar.update(self.pending_bytes)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish: rename shards to their final names and write the index when there is more than one."""
        self.flush()
        self.bar.close()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, tensors), final in zip(self.shards, names):
            os.replace(tmp, self.folder / final)
            weight_map.update({t: final for t in tensors})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return names


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling folder; rename it to `out` only if the body finishes without error."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy config, tokenizer and other non-weight files so the output loads like its base."""
    for p in Path(src).iterdir():
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != INDEX_NAME:
            shutil.copy2(p, dst / p.name)

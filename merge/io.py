"""Sharded safetensors out, named as transformers expects, and the side files that make an output load like
its base. Reading checkpoints and atomic folders are `foundation.io` and `foundation.atomic`; shards are
written inside an atomic folder, so a failed run leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save
from tqdm import tqdm

from foundation.io import INDEX_NAME

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def tensor_bytes(t: torch.Tensor):
    """A zero-copy byte view for hashing (works for bfloat16, which numpy lacks)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy()


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes`, named as transformers expects.

    Each tensor's bytes go to disk as soon as it is added (into a spill file next to the shard), so the
    writer holds no tensor: memory does not grow with the shard size. A shard is assembled when it is full:
    the header safetensors would write (its tensor order and offsets) and then the bytes, copied from the
    spill file in that order a chunk at a time. The file equals `save_file`'s byte for byte."""

    CHUNK = 4 * 1024**2

    def __init__(self, folder: Path, max_shard_bytes: int = 2 * 1024**3, total_bytes: int | None = None, desc: str = "write"):
        self.folder = Path(folder)
        self.max = max_shard_bytes
        self.pending: dict[str, tuple[torch.dtype, list[int], int, int]] = {}  # name -> dtype, shape, spill offset, bytes
        self.pending_bytes = 0
        self.spill = None
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=None, leave=False)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_parts(name, tensor.dtype, tensor.shape, tensor.numel() * tensor.element_size(), [tensor])

    def add_parts(self, name: str, dtype: torch.dtype, shape, size: int, parts) -> None:
        """One tensor of `size` bytes given as consecutive parts (row ranges), each written as it comes: the
        tensor is never whole in memory."""
        if self.pending and self.pending_bytes + size > self.max:
            self.flush()
        if name in self.pending:
            raise ValueError(f"tensor {name} written twice")
        if self.spill is None:
            self.spill = open(self._path(".spill"), "w+b")
        start = self.spill.tell()
        for part in parts:
            t = part.detach().to("cpu").contiguous()
            if t.dtype != dtype:
                raise ValueError(f"tensor {name}: a part is {t.dtype}, the tensor is {dtype}")
            self.spill.write(memoryview(tensor_bytes(t)))
        if self.spill.tell() - start != size:
            raise ValueError(f"tensor {name}: its parts hold {self.spill.tell() - start} bytes, its shape needs {size}")
        self.pending[name] = (dtype, list(shape), start, size)
        self.pending_bytes += size

    def _path(self, suffix: str) -> Path:
        return self.folder / f"shard-{len(self.shards):05d}{suffix}"

    def _layout(self) -> list[tuple[str, str]]:
        """(name, dtype code) in the order safetensors lays the tensors out, taken from safetensors itself
        on one-element stand-ins (its order depends on dtype and name only)."""
        raw = save({n: torch.empty(1, dtype=d) for n, (d, _, _, _) in self.pending.items()})
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__", None)
        return [(k, header[k]["dtype"]) for k in sorted(header, key=lambda k: header[k]["data_offsets"][0])]

    def flush(self) -> None:
        if not self.pending:
            return
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        layout = self._layout()
        for n, code in layout:
            _, shape, _, size = self.pending[n]
            if code == "F4":  # torch packs two values per element; the header counts values
                shape = shape[:-1] + [shape[-1] * 2]
            header[n] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        path = self._path(".tmp")
        buffer = memoryview(bytearray(self.CHUNK))  # one buffer for the copy, not a new bytes object a chunk
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            for n, _ in layout:
                _, _, start, size = self.pending[n]
                self.spill.seek(start)
                while size:
                    got = self.spill.readinto(buffer[: min(size, self.CHUNK)])
                    if not got:
                        raise OSError(f"{self.spill.name}: ended before tensor {n}'s bytes")
                    out.write(buffer[:got])
                    size -= got
        self.spill.close()
        os.remove(self.spill.name)
        self.spill = None
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


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy config, tokenizer and other non-weight files so the output loads like its base."""
    for p in Path(src).iterdir():
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != INDEX_NAME:
            shutil.copy2(p, dst / p.name)

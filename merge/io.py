"""Sharded safetensors out, named as transformers expects, and the side files that make an output load like
its base. Reading checkpoints and atomic folders are `foundation.io` and `foundation.atomic`; shards are
written inside an atomic folder, so a failed run leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from foundation.io import INDEX_NAME

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


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


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy config, tokenizer and other non-weight files so the output loads like its base."""
    for p in Path(src).iterdir():
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != INDEX_NAME:
            shutil.copy2(p, dst / p.name)

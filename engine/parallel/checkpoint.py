"""Reading a Hugging Face safetensors checkpoint piece by piece, and where each family keeps its experts there.

Checkpoints store experts one tensor per expert and matrix (transformers 5 writes them back in that form too),
under names that can differ from the in-memory module names (Mixtral: `block_sparse_moe` on disk, `mlp` in
memory). `CheckpointReader` opens a single file or a sharded index, reads only the requested slice of a tensor
through `safe_open(...).get_slice`, and logs every read with its byte count, so tests can check that a rank read
only its own part and loading can report bytes per rank.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

# Per family: checkpoint names of expert i's (first, second, gate-partner) matrices under the block's prefix,
# shaped (F, H), (H, F), (F, H); and (in-memory, on-disk) name fragments that differ.
EXPERT_KEYS = {
    "switch_transformers": ("experts.expert_{i}.wi.weight", "experts.expert_{i}.wo.weight", None),
    "mixtral": ("experts.{i}.w1.weight", "experts.{i}.w2.weight", "experts.{i}.w3.weight"),
    "qwen2_moe": ("experts.{i}.gate_proj.weight", "experts.{i}.down_proj.weight", "experts.{i}.up_proj.weight"),
    "qwen3_moe": ("experts.{i}.gate_proj.weight", "experts.{i}.down_proj.weight", "experts.{i}.up_proj.weight"),
    "olmoe": ("experts.{i}.gate_proj.weight", "experts.{i}.down_proj.weight", "experts.{i}.up_proj.weight"),
}
NAME_ALIASES = {"mixtral": ((".mlp.", ".block_sparse_moe."),)}
# Families whose checkpoints stack all experts in one tensor per matrix: names of w1 (E, F, H), w2 (E, H, F)
# and the biases b1 (E, F), b2 (E, H) under the block's prefix.
STACKED_KEYS = {"bert_moe": {"w1": "w1", "w2": "w2", "b1": "b1", "b2": "b2"}}


@dataclass
class Read:
    key: str
    index: tuple  # the slice read, as (start, stop) per leading dimension; () for the whole tensor
    nbytes: int


class CheckpointReader:
    def __init__(self, folder: str, family_name: str):
        self.folder, self.family_name = folder, family_name
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                self.file_of = dict(json.load(f)["weight_map"])
        else:
            single = os.path.join(folder, "model.safetensors")
            if not os.path.exists(single):
                raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
            with safe_open(single, "pt") as f:
                self.file_of = {k: "model.safetensors" for k in f.keys()}
        self._handles = {}
        self.reads: list[Read] = []

    def close(self) -> None:
        self._handles.clear()

    def _handle(self, key: str):
        name = self.file_of[key]
        if name not in self._handles:
            self._handles[name] = safe_open(os.path.join(self.folder, name), "pt")
        return self._handles[name]

    def checkpoint_name(self, model_name: str) -> str | None:
        """The checkpoint key holding the model's tensor `model_name`, or None."""
        candidates = [model_name]
        for ours, theirs in NAME_ALIASES.get(self.family_name, ()):
            candidates.append(f".{model_name}".replace(ours, theirs)[1:])
        return next((c for c in candidates if c in self.file_of), None)

    def read(self, key: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """The whole tensor, or rows `[a, b)` / columns `[a, b)` of a 2-D one, without reading the rest."""
        piece = self._handle(key).get_slice(key)
        if rows is None and cols is None:
            tensor, index = piece[:], ()
        elif cols is None:
            tensor, index = piece[rows[0] : rows[1]], (rows,)
        else:
            tensor, index = piece[:, cols[0] : cols[1]], ((0, piece.get_shape()[0]), cols)
        self.reads.append(Read(key, index, tensor.numel() * tensor.element_size()))
        return tensor

    def read_part(self, key: str, index: tuple[tuple[int, int] | None, ...]) -> torch.Tensor:
        """The part of a tensor of any rank given by one `(start, stop)` (or None: all) per leading dimension."""
        piece = self._handle(key).get_slice(key)
        shape = piece.get_shape()
        bounds = tuple((0, shape[d]) if span is None else span for d, span in enumerate(index))
        tensor = piece[tuple(slice(a, b) for a, b in bounds)]
        self.reads.append(Read(key, bounds, tensor.numel() * tensor.element_size()))
        return tensor

    def expert_keys(self, block_name: str, expert: int) -> tuple[str, str, str | None]:
        if self.family_name not in EXPERT_KEYS:
            raise ValueError(f"no checkpoint layout known for family {self.family_name!r}: add it to "
                             "engine.parallel.checkpoint.EXPERT_KEYS")
        keys = []
        for pattern in EXPERT_KEYS[self.family_name]:
            if pattern is None:
                keys.append(None)
                continue
            name = f"{block_name}.{pattern.format(i=expert)}"
            found = self.checkpoint_name(name)
            if found is None:
                raise KeyError(f"expert tensor for {name} not found in {self.folder}")
            keys.append(found)
        return tuple(keys)

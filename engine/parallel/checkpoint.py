"""Reading a Hugging Face safetensors checkpoint piece by piece, and where each family keeps its experts there.

Checkpoints store experts one tensor per expert and matrix (transformers 5 writes them back in that form too),
under names that can differ from the in-memory module names (Mixtral: `block_sparse_moe` on disk, `mlp` in
memory). `CheckpointReader` is `foundation.io.Checkpoint` (which reads only the requested slice of a tensor and
logs every read) plus those names.
"""
from __future__ import annotations

from foundation.io import Checkpoint

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


class CheckpointReader(Checkpoint):
    """A checkpoint read under one family's on-disk names."""

    def __init__(self, folder: str, family_name: str):
        super().__init__(folder)
        self.family_name = family_name

    def checkpoint_name(self, model_name: str) -> str | None:
        """The checkpoint key holding the model's tensor `model_name`, or None."""
        candidates = [model_name]
        for ours, theirs in NAME_ALIASES.get(self.family_name, ()):
            candidates.append(f".{model_name}".replace(ours, theirs)[1:])
        return next((c for c in candidates if c in self.file_of), None)

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

"""A checkpoint read under one family's on-disk names, keeping count of which tensors the model claimed.

Checkpoints store experts one tensor per expert and matrix (transformers 5 writes them back in that form too),
or stacked per matrix, under names that can differ from the in-memory module names (Mixtral: `block_sparse_moe`
on disk, `mlp` in memory); each family declares its layout (`Family.expert_keys`, `stacked_keys`,
`name_aliases`). Every key the model maps to is claimed, read by this rank or not, so a tensor no rank would
use is an error rather than silently ignored.
"""
from __future__ import annotations

from foundation.io import Checkpoint


class CheckpointReader(Checkpoint):
    def __init__(self, folder: str, family):
        super().__init__(folder)
        self.family = family
        self.claimed: set[str] = set()

    def checkpoint_name(self, model_name: str) -> str | None:
        """The checkpoint key holding the model's tensor `model_name` (claimed), or None."""
        found = next((c for c in self.family.checkpoint_names(model_name) if c in self.file_of), None)
        if found is not None:
            self.claimed.add(found)
        return found

    def require(self, model_name: str) -> str:
        found = self.checkpoint_name(model_name)
        if found is None:
            raise KeyError(f"{self.folder}: the checkpoint has no tensor {model_name!r}, which the model needs "
                           f"(family {self.family.name!r}; files {sorted({p.name for p in self.file_of.values()})})")
        return found

    def expert_keys(self, block_name: str, expert: int) -> tuple[str, str, str | None]:
        if self.family.expert_keys is None:
            raise ValueError(f"family {self.family.name!r} declares no on-disk expert layout (Family.expert_keys "
                             "or Family.stacked_keys)")
        return tuple(None if pattern is None else self.require(f"{block_name}.{pattern.format(i=expert)}")
                     for pattern in self.family.expert_keys)

    def unused(self) -> list[str]:
        return sorted(set(self.names) - self.claimed)

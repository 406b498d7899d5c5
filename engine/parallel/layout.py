"""What part of a block's experts one rank holds, in the one layout every expert backend runs.

Families store experts differently (Switch: one module per expert, stacked by our block; Mixtral/Qwen/OLMoE:
`gate_up_proj (E, 2F, H)` concatenated, interleaved or transposed). A distributed block drops those tensors and
keeps `ShardedExperts`: `w1/w3 (E_r, F_r, H)`, `w2 (E_r, H, F_r)`, contiguous, where the rank's part is either

- `ffn` (MoEShard): FFN columns `[start, stop)` of every expert (first matrices by columns, second by rows);
- `experts` (expert parallelism): whole experts `[start, stop)`.

Uneven remainders are allowed (`runtime.split_range`).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.families.stacked import StackedExpertsBlock
from engine.families.switch import SwitchBlock
from engine.moe.experts import ExpertWeights
from engine.moe.layer import MoEBlock

# The attributes through which each block type holds its full experts; dropped once the rank's part is built.
_EXPERT_ATTRIBUTES = {SwitchBlock: ("experts_wi", "experts_wo"), StackedExpertsBlock: ("experts",)}


class ShardedExperts(nn.Module):
    def __init__(self, kind: str, start: int, stop: int, num_experts: int, ffn_width: int, hidden: int,
                 gated: bool, activation: str, dtype: torch.dtype, device="meta"):
        super().__init__()
        if kind not in ("ffn", "experts"):
            raise ValueError(f"unknown shard kind {kind!r}")
        self.kind, self.start, self.stop = kind, start, stop
        self.num_experts, self.ffn_width, self.activation = num_experts, ffn_width, activation
        e, f = (num_experts, stop - start) if kind == "ffn" else (stop - start, ffn_width)

        def param(*shape):
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)

        self.w1 = param(e, f, hidden)
        self.w2 = param(e, hidden, f)
        self.w3 = param(e, f, hidden) if gated else None

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w1, self.w2, self.w3, self.activation)

    def extra_repr(self) -> str:
        what = "ffn columns" if self.kind == "ffn" else "experts"
        return f"{what} [{self.start}, {self.stop}) of {self.num_experts} experts x {self.ffn_width}"


def shard_like(block: MoEBlock, kind: str, start: int, stop: int, device="meta") -> ShardedExperts:
    """An empty part shaped for `block`'s experts (on the meta device unless told: for rank-local loading)."""
    full = block.expert_weights()
    return ShardedExperts(kind, start, stop, full.num_experts, full.ffn_width, full.hidden_size,
                          full.w3 is not None, full.activation, full.w1.dtype, device)


def shard_from(block: MoEBlock, kind: str, start: int, stop: int) -> ShardedExperts:
    """This rank's part copied out of a block that holds all its experts in memory."""
    full = block.expert_weights()
    part = full.slice(start, stop) if kind == "ffn" else ExpertWeights(
        full.w1[start:stop], full.w2[start:stop], None if full.w3 is None else full.w3[start:stop], full.activation)
    shard = shard_like(block, kind, start, stop, device=full.w1.device)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            if getattr(shard, name) is not None:
                getattr(shard, name).copy_(getattr(part, name))
    return shard


def drop_full_experts(block: MoEBlock) -> None:
    """Free the block's full expert tensors once its parts are built (memory per rank: experts / G)."""
    for cls, attributes in _EXPERT_ATTRIBUTES.items():
        if isinstance(block, cls):
            for name in attributes:
                delattr(block, name)
            return
    raise TypeError(f"no expert layout known for {type(block).__name__}; add it to engine.parallel.layout")

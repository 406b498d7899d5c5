"""What part of a block's experts one rank holds, in the one layout every expert backend runs.

Families store experts differently (Switch: one module per expert, stacked by our block; Mixtral/Qwen/OLMoE:
`gate_up_proj (E, 2F, H)` concatenated, interleaved or transposed; BERT-MoE: stacked tensors with biases). A
distributed block drops those tensors and keeps `ShardedExperts`: `w1/w3 (E_r, F_r, H)` stored as one
`w13 (E_r, 2F_r, H)` when gated (one GEMM for both), `w2 (E_r, H, F_r)`, biases `b1 (E_r, F_r)` and
`b2 (E_r, H)`, contiguous, where the rank's part is either

- `ffn` (MoEShard): FFN columns `[start, stop)` of every expert (first matrices by columns, second by rows;
  the second bias lives only in the part that starts at column 0, so the sum over ranks adds it once);
- `experts` (expert parallelism): whole experts `[start, stop)`.

Uneven remainders are allowed (`runtime.split_range`).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.moe.experts import ExpertWeights
from engine.moe.layer import MoEBlock


class ShardedExperts(nn.Module):
    def __init__(self, kind: str, start: int, stop: int, num_experts: int, ffn_width: int, hidden: int,
                 gated: bool, activation: str, dtype: torch.dtype, biases: tuple[bool, bool] = (False, False),
                 device="meta"):
        super().__init__()
        if kind not in ("ffn", "experts"):
            raise ValueError(f"unknown shard kind {kind!r}")
        self.kind, self.start, self.stop = kind, start, stop
        self.num_experts, self.ffn_width, self.activation = num_experts, ffn_width, activation
        e, f = (num_experts, stop - start) if kind == "ffn" else (stop - start, ffn_width)
        self.part_width = f

        def param(*shape):
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)

        self.w13 = param(e, 2 * f, hidden) if gated else None
        self.w1 = None if gated else param(e, f, hidden)
        self.w2 = param(e, hidden, f)
        has_b1, has_b2 = biases
        self.b1 = param(e, f) if has_b1 else None
        self.b2 = param(e, hidden) if has_b2 and (kind == "experts" or start == 0) else None

    def weights(self) -> ExpertWeights:
        f = self.part_width
        if self.w13 is not None:
            return ExpertWeights(self.w13[:, :f], self.w2, self.w13[:, f:], self.activation, w13=self.w13,
                                 b1=self.b1, b2=self.b2)
        return ExpertWeights(self.w1, self.w2, None, self.activation, b1=self.b1, b2=self.b2)

    def extra_repr(self) -> str:
        what = "ffn columns" if self.kind == "ffn" else "experts"
        return f"{what} [{self.start}, {self.stop}) of {self.num_experts} experts x {self.ffn_width}"


def shard_like(block: MoEBlock, kind: str, start: int, stop: int, device="meta") -> ShardedExperts:
    """An empty part shaped for `block`'s experts (on the meta device unless told: for rank-local loading)."""
    full = block.expert_weights()
    return ShardedExperts(kind, start, stop, full.num_experts, full.ffn_width, full.hidden_size,
                          full.w3 is not None, full.activation, full.w1.dtype,
                          (full.b1 is not None, full.b2 is not None), device)


def part_of(full: ExpertWeights, kind: str, start: int, stop: int) -> ExpertWeights:
    """Views of this rank's part of `full`."""
    if kind == "ffn":
        return full.slice(start, stop)

    def cut(t):
        return None if t is None else t[start:stop]

    return ExpertWeights(cut(full.w1), cut(full.w2), cut(full.w3), full.activation, b1=cut(full.b1), b2=cut(full.b2))


def shard_from(block: MoEBlock, kind: str, start: int, stop: int) -> ShardedExperts:
    """This rank's part copied out of a block that holds all its experts in memory."""
    part = part_of(block.expert_weights(), kind, start, stop)
    shard = shard_like(block, kind, start, stop, device=part.w1.device)
    fill(shard, part)
    return shard


def fill(shard: ShardedExperts, part: ExpertWeights) -> None:
    """Copy `part` (same shapes) into `shard`'s tensors."""
    with torch.no_grad():
        if shard.w13 is not None:
            shard.w13.copy_(torch.cat([part.w1, part.w3], dim=1))
        else:
            shard.w1.copy_(part.w1)
        shard.w2.copy_(part.w2)
        for name in ("b1", "b2"):
            if getattr(shard, name) is not None:
                getattr(shard, name).copy_(getattr(part, name))


def part_lora(block: MoEBlock, shard: ShardedExperts):
    """The expert LoRA of `block` for this rank's `shard` (an `engine.lora.expert_ranks.BlockExpertLoRA`, set when
    adapters with expert parameters are attached), or None."""
    lora = getattr(block, "expert_lora", None)
    return None if lora is None else lora.part(shard)


def drop_full_experts(block: MoEBlock) -> None:
    """Free the block's full expert tensors once its parts are built (memory per rank: experts / G). They are
    found as the parameters the block's `expert_weights()` views are cut from, whatever the family's layout."""
    full = block.expert_weights()
    roots = [t if t._base is None else t._base for t in (full.w1, full.w2, full.w3, full.w13, full.b1, full.b2)
             if t is not None]
    owned = [(name, p) for name, p in block.named_parameters() if any(p is r for r in roots)]
    if len(owned) < len({id(r) for r in roots}):
        raise TypeError(f"{type(block).__name__}.expert_weights() does not view the block's own parameters; "
                        "engine.parallel cannot tell which tensors to free")
    for name, _ in owned:
        owner, _, attr = name.rpartition(".")
        delattr(block.get_submodule(owner) if owner else block, attr)

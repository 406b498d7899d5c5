"""LoRA on stacked MoE expert parameters (PEFT's `target_parameters`), mixed per batch row.

PEFT adapts a stacked parameter W (E, out, in) with one rank-r pair per expert: W_e + s * B_e A_e. For
`gate_up_proj` the update lands before the activation, so it cannot be added to the layer's output: the
expert computation itself changes. An `ExpertLoRA` rides on the block's `ExpertWeights` (`lora=`), and
`run_experts` hands such weights to `ExpertLoRA.run`: pairs sorted by expert, as the fused kernels sort them;
per expert one GEMM for gate/up; then one launch of the packed segment-grouped mixture (`tessera_kernels.lora_sgmv`)
adds every pair's adapters' shrink/expand for its expert (the group is (adapter slot, expert)); the
activation; per expert one GEMM for down; one more mixture launch. The fused Triton expert kernels are left as
they are (another helper owns them): with expert adapters active a block runs this path instead (its base
GEMMs are one matmul per expert with rows, like the `torch` backend), and without them the fused path runs
untouched.

Under MoEShard a rank holds FFN columns [start, stop) of every expert: the gate and up rows of B follow the
slice (each half apart, as the base gate_up is cut), and for down_proj the columns of A do (partial A h sums
over ranks before B, which is linear, and the layer's reduce-scatter adds them), so `slice` keeps the sum over
slices exact. Under expert parallelism a rank holds whole experts [start, stop): `experts` keeps the full
stacks and offsets the expert ids into them, so nothing is copied. How tokens of other ranks find their
adapters is `engine.lora.expert_ranks`. `expert_lora_reference` is the token-by-token oracle.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from tessera_kernels.expert_gemm import apply_activation_reference
from tessera_kernels.fused_moe import fused_experts_reference
from tessera_kernels.lora_sgmv import lora_sgmv


@dataclass
class ExpertLoRA:
    """The adapters of one experts module for the current batch.

    gate_up/down: (A [slots, E, R, in], B [slots, E, out, R], scales [slots]) or None; routing: tokens T ->
    (slots [T, K], weights [T, K]) for the layer's input tokens (routing weights, not yet scaled);
    first_expert: the stacks' index of the weights' expert 0 (a rank holding experts [start, stop))."""

    gate_up: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    down: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    routing: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    backend: str = "auto"
    first_expert: int = 0

    def slice(self, start: int, stop: int, ffn: int) -> ExpertLoRA:
        """This LoRA for FFN columns [start, stop) of every expert (see the module docstring)."""
        gate_up = down = None
        if self.gate_up is not None:
            a, b, s = self.gate_up
            b = torch.cat([b[..., start:stop, :], b[..., ffn + start:ffn + stop, :]], dim=-2)
            gate_up = (a, b, s)
        if self.down is not None:
            a, b, s = self.down
            down = (a[..., start:stop], b, s)
        return ExpertLoRA(gate_up, down, self.routing, self.backend, self.first_expert)

    def experts(self, start: int, stop: int) -> ExpertLoRA:
        """This LoRA for experts [start, stop) (expert parallelism): the same stacks, expert ids offset."""
        return replace(self, first_expert=self.first_expert + start)

    def _mix(self, pair, x, out, slots, weights, experts) -> None:
        """out += the pairs' adapter mixture for their experts: one packed launch over all experts, with
        (adapter slot, expert) as the group, so each expert's A and B tiles of each adapter are read once per
        run of pairs that share them."""
        a, b, scales = pair
        stacked = a.shape[1]  # experts in the stacks: all of them, also where the weights hold a range
        group = slots.long() * stacked + (experts[:, None] + self.first_expert)
        combined = torch.where(slots >= 0, group, -1).to(torch.int32)
        scaled = weights * scales[slots.clamp(min=0).long()]
        lora_sgmv(x, out, a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:]), combined, scaled,
                  backend=self.backend)

    def run(self, hidden, topk_ids, topk_weights, weights, out_dtype=None) -> torch.Tensor:
        """What `run_experts` returns for `weights` (an ExpertWeights with this LoRA), LoRA included."""
        num_tokens, top_k = topk_ids.shape
        token_slots, token_weights = self.routing(num_tokens)
        num_experts, ffn = weights.num_experts, weights.ffn_width
        flat = topk_ids.reshape(-1)
        key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()
        order = order[:sum(counts)]  # pairs computed here, sorted by expert
        tokens, experts = order // top_k, key[order]
        x = hidden[tokens]
        slots, slot_weights = token_slots[tokens], token_weights[tokens]
        w13 = weights.w13 if weights.w13 is not None else \
            weights.w1 if weights.w3 is None else torch.cat([weights.w1, weights.w3], dim=1)
        pre = _per_expert(x, w13, counts)
        if weights.b1 is not None:
            pre[:, :ffn] += weights.b1[experts]
        if self.gate_up is not None:
            self._mix(self.gate_up, x, pre, slots, slot_weights, experts)
        if weights.w3 is None:
            h = apply_activation_reference(pre, weights.activation)
        else:
            h = apply_activation_reference(pre[:, :ffn], weights.activation) * pre[:, ffn:]
        y = _per_expert(h, weights.w2, counts)
        if weights.b2 is not None:
            y += weights.b2[experts]
        if self.down is not None:
            self._mix(self.down, h.contiguous(), y, slots, slot_weights, experts)
        if topk_weights is not None:
            y = y * topk_weights.reshape(-1)[order, None]
        out = torch.zeros(num_tokens, weights.hidden_size, dtype=out_dtype or hidden.dtype, device=hidden.device)
        return out.index_add_(0, tokens, y.to(out.dtype))


def _per_expert(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x (pairs sorted by expert, `counts` per expert) @ w[e].T for each pair's expert."""
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count:
            torch.matmul(x[start:start + count], w[expert].T, out=out[start:start + count])
            start += count
    return out


def expert_lora_reference(hidden, topk_ids, topk_weights, weights, lora: ExpertLoRA) -> torch.Tensor:
    """The definition `ExpertLoRA.run` must meet, in fp32: every (token, expert) pair gets its own merged expert,
    W_e + sum over the token's adapters of weight * scale * B_e A_e, run by the plain experts reference."""
    num_tokens, top_k = topk_ids.shape
    num_experts, ffn = weights.num_experts, weights.ffn_width
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    experts = topk_ids.clamp(0, num_experts - 1).reshape(-1).long()
    token_slots, token_weights = lora.routing(num_tokens)
    tokens = torch.arange(num_tokens).repeat_interleave(top_k)

    def merged(w, pair):  # (pairs, out, in): each pair's expert with its token's adapters added
        w = w.float()[experts]
        if pair is not None:
            a, b, scales = pair
            stacked = experts + lora.first_expert  # the stacks hold every expert, the weights maybe a range
            for k in range(token_slots.shape[1]):
                slot = token_slots[tokens, k].long()
                scale = torch.where(slot >= 0, token_weights[tokens, k] * scales[slot.clamp(min=0)], 0.0)
                w = w + scale[:, None, None] * (b[slot.clamp(min=0), stacked].float()
                                                @ a[slot.clamp(min=0), stacked].float())
        return w

    w13 = weights.w1 if weights.w3 is None else torch.cat([weights.w1, weights.w3], dim=1)
    w13 = merged(w13, lora.gate_up)
    pair_ids = torch.where(valid.reshape(-1), torch.arange(num_tokens * top_k), -1).view(num_tokens, top_k)
    b1, b2 = (None if b is None else b[experts] for b in (weights.b1, weights.b2))
    return fused_experts_reference(hidden, pair_ids, topk_weights, w13[:, :ffn], merged(weights.w2, lora.down),
                                   None if weights.w3 is None else w13[:, ffn:], weights.activation, torch.float32,
                                   b1, b2)

"""LoRA on stacked MoE expert parameters (PEFT's `target_parameters`), mixed per batch row.

PEFT adapts a stacked parameter W (E, out, in) with one rank-r pair per expert: W_e + s * B_e A_e. For
`gate_up_proj` the update lands before the activation, so it cannot be added to the layer's output: the
expert computation itself changes. An `ExpertLoRA` rides on the block's `ExpertWeights` (`lora=`), and
`run_experts` hands such weights to `ExpertLoRA.run`: pairs sorted by expert, as the fused kernels sort them;
per expert one GEMM for gate/up, the packed segment-grouped mixture (`kernels.lora_sgmv`) adds each pair's
adapters' shrink/expand for that expert, the activation, one GEMM for down plus its mixture. The fused Triton
expert kernels are left as they are (another helper owns them); with expert adapters active a block runs this
path instead, and without them the fused path runs untouched.

Under MoEShard a rank holds FFN columns [start, stop) of every expert: the gate and up rows of B follow the
slice, and for down_proj the columns of A do (partial A h sums over ranks before B, which is linear), so
`slice` keeps the sum over slices exact. `expert_lora_reference` is the token-by-token oracle.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.expert_gemm import apply_activation_reference
from kernels.lora_sgmv import lora_sgmv


@dataclass
class ExpertLoRA:
    """The adapters of one experts module for the current batch.

    gate_up/down: (A [slots, E, R, in], B [slots, E, out, R], scales [slots]) or None; routing: tokens T ->
    (slots [T, K], weights [T, K]) for the layer's input tokens (routing weights, not yet scaled)."""

    gate_up: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    down: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    routing: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    backend: str = "auto"

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
        return ExpertLoRA(gate_up, down, self.routing, self.backend)

    @staticmethod
    def _delta(which, routing, expert: int, x: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor,
               backend: str) -> None:
        a, b, scales = which
        slots = routing[0][tokens]
        weights = routing[1][tokens] * scales[slots.clamp(min=0).long()]
        lora_sgmv(x, out, a[:, expert], b[:, expert], slots, weights, backend=backend)

    def run(self, hidden, topk_ids, topk_weights, weights, out_dtype=None) -> torch.Tensor:
        """What `run_experts` returns for `weights` (an ExpertWeights with this LoRA), LoRA included."""
        num_tokens, top_k = topk_ids.shape
        routing = self.routing(num_tokens)
        num_experts, ffn = weights.num_experts, weights.ffn_width
        flat = topk_ids.reshape(-1)
        valid = (flat >= 0) & (flat < num_experts)
        key = torch.where(valid, flat, num_experts)
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()
        out = torch.zeros(num_tokens, weights.hidden_size, dtype=out_dtype or hidden.dtype, device=hidden.device)
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            pairs = order[start:start + count]
            start += count
            tokens = pairs // top_k
            x = hidden[tokens]
            w1 = weights.w1[expert] if weights.w3 is None else torch.cat([weights.w1[expert], weights.w3[expert]])
            pre = x @ w1.T
            if weights.b1 is not None:
                pre[:, :ffn] += weights.b1[expert]
            if self.gate_up is not None:
                self._delta(self.gate_up, routing, expert, x, tokens, pre, self.backend)
            if weights.w3 is None:
                h = apply_activation_reference(pre, weights.activation)
            else:
                h = apply_activation_reference(pre[:, :ffn], weights.activation) * pre[:, ffn:]
            y = h @ weights.w2[expert].T
            if weights.b2 is not None:
                y = y + weights.b2[expert]
            if self.down is not None:
                self._delta(self.down, routing, expert, h.contiguous(), tokens, y, self.backend)
            if topk_weights is not None:
                y = y * topk_weights.reshape(-1)[pairs, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def expert_lora_reference(hidden, topk_ids, topk_weights, weights, lora: ExpertLoRA) -> torch.Tensor:
    """Token by token, pair by pair, adapter by adapter, in fp32: the definition `ExpertLoRA.run` must meet."""
    num_experts, ffn = weights.num_experts, weights.ffn_width
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    token_slots, token_weights = lora.routing(hidden.shape[0])
    for t in range(hidden.shape[0]):
        x = hidden[t].float()
        for j, e in enumerate(topk_ids[t].tolist()):
            if not 0 <= e < num_experts:
                continue
            gate = weights.w1[e].float() @ x
            up = None if weights.w3 is None else weights.w3[e].float() @ x
            if weights.b1 is not None:
                gate = gate + weights.b1[e].float()
            for k, slot in enumerate(token_slots[t].tolist()):
                if slot < 0 or lora.gate_up is None:
                    continue
                a, b, s = lora.gate_up
                delta = float(token_weights[t, k] * s[slot]) * (b[slot, e].float() @ (a[slot, e].float() @ x))
                gate = gate + delta[:ffn]
                if up is not None:
                    up = up + delta[ffn:]
            h = apply_activation_reference(gate, weights.activation)
            if up is not None:
                h = h * up
            y = weights.w2[e].float() @ h
            if weights.b2 is not None:
                y = y + weights.b2[e].float()
            for k, slot in enumerate(token_slots[t].tolist()):
                if slot < 0 or lora.down is None:
                    continue
                a, b, s = lora.down
                y = y + float(token_weights[t, k] * s[slot]) * (b[slot, e].float() @ (a[slot, e].float() @ h))
            out[t] += (1.0 if topk_weights is None else float(topk_weights[t, j])) * y
    return out

"""Routers, with each family's exact arithmetic.

Two kinds cover the families we run:
- `switch`: top-1 over an fp32 softmax of an fp32 classifier; the expert output is scaled by the winning
  probability cast back to the input dtype (Switch Transformers).
- `softmax_topk`: softmax in fp32 over logits computed in the model dtype, top-k, optional renormalisation, and
  the weights either kept in fp32 (Mixtral) or cast to the logits' dtype (Qwen-MoE, OLMoE).

Capacity: dropless by default. `capacity="hf"` reproduces Switch's per-sequence expert capacity: a token is
dropped when it is past the first `expert_capacity` tokens of its sequence routed to the same expert. Dropped
tokens get expert id `E` (outside the range), which every backend treats as "no expert output": zeros, as in
transformers 5.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RouterSpec:
    kind: str  # "switch" or "softmax_topk"
    num_experts: int
    top_k: int
    normalize: bool = False
    weights_in_fp32: bool = True
    expert_capacity: int | None = None  # Switch's per-sequence capacity, used only with capacity="hf"

    def __post_init__(self):
        if self.kind not in ("switch", "softmax_topk"):
            raise ValueError(f"unknown router kind {self.kind!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")


def router_logits(spec: RouterSpec, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if spec.kind == "switch":
        return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    return F.linear(hidden, weight, bias)


def route(spec: RouterSpec, logits: torch.Tensor, input_dtype: torch.dtype,
          sequence_shape: tuple[int, int] | None = None, capacity: str | None = None):
    """`logits (T, E)` → `(topk_ids (T, k) int64, topk_weights (T, k))`.

    `sequence_shape` is `(batch, seq_len)` of the flattened tokens; it is needed only for `capacity="hf"`.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if spec.kind == "switch":
        probs = probs.to(input_dtype)
        top_weights, top_ids = probs.max(dim=-1, keepdim=True)
    else:
        top_weights, top_ids = torch.topk(probs, spec.top_k, dim=-1)
        if spec.normalize:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        if not spec.weights_in_fp32:
            top_weights = top_weights.to(logits.dtype)
    if capacity == "hf" and spec.expert_capacity is not None:
        top_ids = _drop_over_capacity(top_ids, spec, sequence_shape)
    return top_ids, top_weights


def _drop_over_capacity(top_ids: torch.Tensor, spec: RouterSpec, sequence_shape):
    if sequence_shape is None:
        raise ValueError("capacity='hf' needs the (batch, seq_len) shape of the tokens")
    batch, seq_len = sequence_shape
    # A comparison, not F.one_hot, which checks the ids' range on the host.
    one_hot = (top_ids[:, :1] == torch.arange(spec.num_experts, device=top_ids.device)).long()
    one_hot = one_hot.view(batch, seq_len, spec.num_experts)
    position_in_expert = torch.cumsum(one_hot, dim=1).view(batch * seq_len, spec.num_experts)
    rank = position_in_expert.gather(1, top_ids[:, :1])
    return torch.where(rank <= spec.expert_capacity, top_ids, spec.num_experts)

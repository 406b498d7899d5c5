"""The block for families whose experts are one Hugging Face module holding stacked 3-D weights
(`gate_up_proj (E, 2F, H)`, `down_proj (E, H, F)`) behind a `gate` router: Mixtral, Qwen2/3-MoE, OLMoE.

The Hugging Face `gate` and `experts` modules stay as children under their own names, so the state dict
keeps its keys and `save_pretrained` still writes a standard checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.families.base import check_shape
from engine.moe.experts import ExpertWeights, activation_from_hf
from engine.moe.layer import MoEBlock
from engine.moe.router import RouterSpec

# The per-expert names Qwen-style checkpoints use on disk (Qwen2/3-MoE, OLMoE, and most newer families).
GATE_DOWN_UP = ("experts.{i}.gate_proj.weight", "experts.{i}.down_proj.weight", "experts.{i}.up_proj.weight")


def stacked_expert_weights(experts, activation: str) -> ExpertWeights:
    """Views of a Hugging Face experts module's gate, up and down matrices in our `(E, F, H)` layout."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):  # (E, H, 2F) / (E, F, H) layouts
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if getattr(experts, "is_concatenated", True):
        width = gate_up.shape[1] // 2
        return ExpertWeights(gate_up[:, :width], down, gate_up[:, width:], activation, w13=gate_up)
    # interleaved [g0, u0, g1, u1, ...]
    return ExpertWeights(gate_up[:, 0::2], down, gate_up[:, 1::2], activation)


class StackedExpertsBlock(MoEBlock):
    def __init__(self, hf_block, spec: RouterSpec, activation: str, backend: str, capacity=None):
        super().__init__(spec, backend, capacity)
        self.gate = hf_block.gate
        self.experts = hf_block.experts
        self.activation = activation
        # Qwen2-MoE: a dense shared expert behind a sigmoid gate, added to the routed output.
        self.shared_expert = getattr(hf_block, "shared_expert", None)
        self.shared_expert_gate = getattr(hf_block, "shared_expert_gate", None)

    def expert_weights(self) -> ExpertWeights:
        return stacked_expert_weights(self.experts, self.activation)

    def router_parameters(self):
        return self.gate.weight, getattr(self.gate, "bias", None)

    def extra_output(self, hidden: torch.Tensor):
        if self.shared_expert is None:
            return None
        return F.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)


def stacked_converter(*, ffn: str, num_experts: str = "num_experts", normalize: bool | str = "norm_topk_prob",
                      weights_in_fp32: bool = False):
    """A family's `convert`, given the config attributes that hold its FFN width and expert count, and its
    router's arithmetic (`normalize`: a bool, or the config attribute that says; routing weights in fp32 or in
    the model dtype). The defaults are the Qwen-style families'."""

    def convert(hf_block, config, backend, capacity) -> StackedExpertsBlock:
        e, f, h, experts = getattr(config, num_experts), getattr(config, ffn), config.hidden_size, hf_block.experts
        if getattr(experts, "has_bias", False):
            raise ValueError(f"{type(experts).__name__} has expert biases, which tessera's kernels do not take yet")
        transposed = getattr(experts, "is_transposed", False)
        check_shape(hf_block.gate.weight, (e, h), "router weight")
        check_shape(experts.gate_up_proj, (e, h, 2 * f) if transposed else (e, 2 * f, h), "experts.gate_up_proj")
        check_shape(experts.down_proj, (e, f, h) if transposed else (e, h, f), "experts.down_proj")
        spec = RouterSpec("softmax_topk", e, config.num_experts_per_tok, weights_in_fp32=weights_in_fp32,
                          normalize=getattr(config, normalize) if isinstance(normalize, str) else normalize)
        return StackedExpertsBlock(hf_block, spec, activation_from_hf(config.hidden_act), backend, capacity)

    return convert

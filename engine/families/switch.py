"""Switch Transformers (encoder-only and encoder-decoder): top-1 router in fp32, expert output scaled by the
winning probability, ReLU experts, optional per-sequence expert capacity.

Hugging Face keeps one `DenseActDense` module per expert; our block stacks them once into `experts_wi (E, F, H)`
and `experts_wo (E, H, F)` so one kernel launch serves all experts. The router keeps its Hugging Face name.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.families.base import Family, check_shape, tiny
from engine.moe.experts import ExpertWeights, activation_from_hf
from engine.moe.layer import MoEBlock
from engine.moe.router import RouterSpec


class SwitchBlock(MoEBlock):
    def __init__(self, hf_block, config, backend: str, capacity=None):
        num_experts = config.num_experts
        spec = RouterSpec("switch", num_experts, 1, expert_capacity=config.expert_capacity)
        super().__init__(spec, backend, capacity)
        self.router = hf_block.router
        self.activation = activation_from_hf(config.dense_act_fn)
        experts = [hf_block.experts[f"expert_{i}"] for i in range(num_experts)]
        for i, expert in enumerate(experts):
            check_shape(expert.wi.weight, (config.d_ff, config.d_model), f"experts.expert_{i}.wi.weight")
            check_shape(expert.wo.weight, (config.d_model, config.d_ff), f"experts.expert_{i}.wo.weight")
        check_shape(self.router.classifier.weight, (num_experts, config.d_model), "router.classifier.weight")
        with torch.no_grad():
            self.experts_wi = nn.Parameter(torch.stack([e.wi.weight for e in experts]), requires_grad=False)
            self.experts_wo = nn.Parameter(torch.stack([e.wo.weight for e in experts]), requires_grad=False)

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.experts_wi, self.experts_wo, None, self.activation)

    def router_parameters(self):
        return self.router.classifier.weight, self.router.classifier.bias


FAMILY = Family(
    "switch_transformers", ("SwitchTransformersSparseMLP",), SwitchBlock,
    tiny("SwitchTransformersConfig", vocab_size=96, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2,
         num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_heads=4, num_experts=4, expert_capacity=64,
         router_jitter_noise=0.0, dropout_rate=0.0, relative_attention_num_buckets=8, decoder_start_token_id=0),
    auto_class="AutoModelForSeq2SeqLM",
    expert_keys=("experts.expert_{i}.wi.weight", "experts.expert_{i}.wo.weight", None))

"""BERT-MoE (`engine.models.bert_moe`): top-k softmax router with renormalised fp32 weights, GELU experts with
biases. The embedded default model of `serve_moe.py` (all-MiniLM-L6-v2 upcycled) is of this family."""
from __future__ import annotations

from engine.families.base import Family, check_shape, tiny
from engine.models.bert_moe import BertMoeConfig  # importing it registers model_type "bert_moe" with transformers
from engine.moe.experts import ExpertWeights, activation_from_hf
from engine.moe.layer import MoEBlock
from engine.moe.router import RouterSpec


class BertMoeBlock(MoEBlock):
    def __init__(self, hf_block, config, backend: str, capacity=None):
        e, f, h = config.num_experts, config.intermediate_size, config.hidden_size
        for name, shape in (("gate.weight", (e, h)), ("w1", (e, f, h)), ("b1", (e, f)), ("w2", (e, h, f)),
                            ("b2", (e, h))):
            check_shape(hf_block.get_parameter(name), shape, f"experts {name}")
        super().__init__(RouterSpec("softmax_topk", e, config.num_experts_per_tok, normalize=True), backend, capacity)
        self.gate, self.w1, self.b1, self.w2, self.b2 = hf_block.gate, hf_block.w1, hf_block.b1, hf_block.w2, hf_block.b2
        self.activation = activation_from_hf(config.hidden_act)

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.w1, self.w2, None, self.activation, b1=self.b1, b2=self.b2)

    def router_parameters(self):
        return self.gate.weight, None


FAMILY = Family(
    "bert_moe", ("BertMoeFFN",), BertMoeBlock,
    tiny(BertMoeConfig, vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
         num_attention_heads=4, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64),
    auto_class="AutoModel", stacked_keys={"w1": "w1", "w2": "w2", "b1": "b1", "b2": "b2"})

"""BERT with Mixture-of-Experts feed-forward layers, as a transformers model (`model_type: bert_moe`).

Each layer's FFN becomes E experts (`w1 (E, F, H)`, `b1 (E, F)`, `w2 (E, H, F)`, `b2 (E, H)`) behind a top-k
softmax router with renormalised weights; the residual and LayerNorm of BERT's output block stay as they are.
`BertMoeFFN.forward` is the plain eager implementation (the Hugging Face-style reference); `patch_moe` swaps it
for tessera's block like any other family.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel
from transformers.activations import ACT2FN


class BertMoeConfig(BertConfig):
    model_type = "bert_moe"

    def __init__(self, num_experts: int = 8, num_experts_per_tok: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok


class BertMoeFFN(nn.Module):
    def __init__(self, config: BertMoeConfig):
        super().__init__()
        e, f, h = config.num_experts, config.intermediate_size, config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(h, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, f, h))
        self.b1 = nn.Parameter(torch.zeros(e, f))
        self.w2 = nn.Parameter(torch.empty(e, h, f))
        self.b2 = nn.Parameter(torch.zeros(e, h))
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        probs = torch.softmax(F.linear(x, self.gate.weight).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for expert in range(self.w1.shape[0]):
            tokens, choice = torch.nonzero(experts == expert, as_tuple=True)
            if tokens.numel():
                y = F.linear(self.act(F.linear(x[tokens], self.w1[expert], self.b1[expert])), self.w2[expert],
                             self.b2[expert])
                out.index_add_(0, tokens, (y * weights[tokens, choice, None]).to(out.dtype))
        return out.view_as(hidden_states)


class BertMoeModel(BertModel):
    config_class = BertMoeConfig

    def __init__(self, config: BertMoeConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        for layer in self.encoder.layer:
            layer.intermediate = BertMoeFFN(config)  # returns the FFN output (H wide) ...
            layer.output.dense = nn.Identity()  # ... so BERT's output block only adds the residual and norms
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BertMoeFFN):
            for weight in (module.w1, module.w2):
                nn.init.normal_(weight, std=self.config.initializer_range)


AutoConfig.register("bert_moe", BertMoeConfig, exist_ok=True)
AutoModel.register(BertMoeConfig, BertMoeModel, exist_ok=True)


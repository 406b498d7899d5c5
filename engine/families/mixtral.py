"""Mixtral: top-k softmax router, weights renormalised and kept in fp32, SiLU-gated experts."""
from engine.families.base import Family, tiny
from engine.families.stacked import stacked_converter

FAMILY = Family(
    "mixtral", ("MixtralSparseMoeBlock",),
    stacked_converter(ffn="intermediate_size", num_experts="num_local_experts", normalize=True, weights_in_fp32=True),
    tiny("MixtralConfig", vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
         max_position_embeddings=128, router_jitter_noise=0.0),
    uses_experts_interface=True,
    expert_keys=("experts.{i}.w1.weight", "experts.{i}.w2.weight", "experts.{i}.w3.weight"),
    name_aliases=((".mlp.", ".block_sparse_moe."),))

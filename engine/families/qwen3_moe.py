"""Qwen3-MoE: as Qwen2-MoE without the shared expert; `norm_topk_prob` usually on."""
from engine.families.base import Family, tiny
from engine.families.stacked import GATE_DOWN_UP, stacked_converter

FAMILY = Family(
    "qwen3_moe", ("Qwen3MoeSparseMoeBlock",),
    stacked_converter(ffn="moe_intermediate_size"),
    tiny("Qwen3MoeConfig", vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
         num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=128),
    uses_experts_interface=True, expert_keys=GATE_DOWN_UP)

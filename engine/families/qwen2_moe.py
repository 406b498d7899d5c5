"""Qwen2-MoE: top-k softmax router (renormalised only if `norm_topk_prob`), weights cast to the model dtype,
SiLU-gated experts, and a shared expert behind a sigmoid gate on every token."""
from engine.families.base import Family, tiny
from engine.families.stacked import GATE_DOWN_UP, stacked_converter

FAMILY = Family(
    "qwen2_moe", ("Qwen2MoeSparseMoeBlock",),
    stacked_converter(ffn="moe_intermediate_size"),
    tiny("Qwen2MoeConfig", vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
         shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=128),
    uses_experts_interface=True, expert_keys=GATE_DOWN_UP)

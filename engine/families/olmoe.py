"""OLMoE: top-k softmax router without renormalisation (by default), weights cast to the model dtype."""
from engine.families.base import Family, tiny
from engine.families.stacked import GATE_DOWN_UP, stacked_converter

FAMILY = Family(
    "olmoe", ("OlmoeSparseMoeBlock",),
    stacked_converter(ffn="intermediate_size"),
    tiny("OlmoeConfig", vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
         num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
         max_position_embeddings=128),
    uses_experts_interface=True, expert_keys=GATE_DOWN_UP)

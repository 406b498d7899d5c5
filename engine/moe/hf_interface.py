"""tessera as a transformers experts implementation, for families whose experts go through transformers'
`ExpertsInterface`: `from_pretrained(..., experts_implementation="tessera")` then runs the experts on our
kernels while transformers keeps its own routers. Registered when `engine` is imported."""
from __future__ import annotations

import torch

from engine.families.stacked import stacked_expert_weights
from engine.moe.experts import activation_from_hf, default_backend, run_experts


def tessera_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    if getattr(self, "has_bias", False) or not getattr(self, "has_gate", True):
        raise ValueError(f"experts_implementation='tessera' does not support {type(self).__name__} "
                         "(expert biases or ungated experts); use patch_moe, or another implementation")
    weights = stacked_expert_weights(self, activation_from_hf(self.config.hidden_act))
    return run_experts(hidden_states, top_k_index, top_k_weights, weights, default_backend(hidden_states.device))


def register() -> bool:
    """Add "tessera" to transformers' experts implementations; False where this transformers has none."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register("tessera", tessera_experts_forward)
    return True

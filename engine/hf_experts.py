"""tessera as a transformers experts implementation, for families whose experts go through transformers'
`ExpertsInterface`: after `import engine`, `from_pretrained(..., experts_implementation="tessera")` runs the
experts on our backends while transformers keeps its own routers.

Importing transformers' MoE integration takes seconds, so `import engine` does not do it: the implementation
is registered the moment transformers itself imports that module (or at once if it already has).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_MODULE = "transformers.integrations.moe"


def tessera_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    from engine.families.stacked import stacked_expert_weights
    from engine.moe.experts import activation_from_hf, default_backend, run_experts

    if getattr(self, "has_bias", False) or not getattr(self, "has_gate", True):
        raise ValueError(f"experts_implementation='tessera' does not support {type(self).__name__} "
                         "(expert biases or ungated experts); use engine.patch_moe, or another implementation")
    weights = stacked_expert_weights(self, activation_from_hf(self.config.hidden_act))
    return run_experts(hidden_states, top_k_index, top_k_weights, weights, default_backend(hidden_states.device))


def _register(module) -> None:
    interface = getattr(module, "ExpertsInterface", None)
    if interface is not None:  # transformers too old for ExpertsInterface: patch_moe still works
        interface.register("tessera", tessera_experts_forward)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers' MoE integration is first imported, it wraps that module's
    loader so the registration runs right after the module has executed."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _register(module)

            spec.loader.exec_module = exec_module
        return spec


def register_experts_implementation() -> None:
    if _MODULE in sys.modules:
        _register(sys.modules[_MODULE])
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())

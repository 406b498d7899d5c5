"""tessera's engine: the model registry, the MoE layer, distributed strategies and LoRA routing.

The public entry points are imported lazily so that `import engine` stays cheap and never fails on a
machine without Triton or a GPU.
"""
from __future__ import annotations

import importlib

from engine.hf_experts import register_experts_implementation

register_experts_implementation()  # `from_pretrained(..., experts_implementation="tessera")` after `import engine`

_LAZY = {
    "load": "engine.loader",
    "patch_moe": "engine.families",
    "register_model": "engine.registry",
    "register_adapter": "engine.registry",
    "get_model_entry": "engine.registry",
    "list_models": "engine.registry",
    "ModelEntry": "engine.registry",
    "TaskRouter": "engine.lora.router",
    "generate_batch": "engine.serving.scheduler",  # offline continuous batching, the server's scheduler
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

"""LoRA routing: tasks, encoders, adapter pools and caches, the router, and per-row adapter mixing.

`attach_adapters(model, adapters, router=None)` is the entry point `engine.load(base, adapters=...)` uses.
Importing this package never needs Triton: the mixture falls back to its PyTorch reference.
"""
from engine.lora.adapters import AdapterPool, AdapterSpec, read_adapter
from engine.lora.affinity import AffinityMatrix, compute_affinity
from engine.lora.cache import AdapterCache
from engine.lora.encoder import CachedEncoder, Encoder, MiniLMEncoder, default_encoder
from engine.lora.errors import AdapterError, CacheFullError, RoutingError
from engine.lora.model import LoRAModel, attach_adapters
from engine.lora.peft_merge import peft_weighted_model
from engine.lora.router import RoutingDecision, TaskRouter
from engine.lora.tasks import Task, load_task_folder

__all__ = [
    "AdapterCache", "AdapterError", "AdapterPool", "AdapterSpec", "AffinityMatrix", "CacheFullError",
    "CachedEncoder", "Encoder", "LoRAModel", "MiniLMEncoder", "RoutingDecision", "RoutingError", "Task",
    "TaskRouter", "attach_adapters", "compute_affinity", "default_encoder", "load_task_folder",
    "peft_weighted_model", "read_adapter",
]

"""Working with a model's tessera MoE blocks once they are in place (`engine.families.patch_moe` puts them there)."""
from __future__ import annotations

import torch
from torch import nn

from engine.moe.experts import check_backend
from engine.moe.layer import MoEBlock, RouterHealth


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEBlock)]


def set_backend(model: nn.Module, backend: str) -> None:
    device = model_device(model)
    check_backend(backend, device)
    for _, block in moe_blocks(model):
        block.backend = backend


def track_routing(model: nn.Module, enabled: bool = True) -> None:
    """Start (or stop) counting routed pairs per expert in every MoE block, on the device."""
    for _, block in moe_blocks(model):
        if enabled:
            device = next(iter(block.parameters())).device
            block.routed_counts = torch.zeros(block.spec.num_experts + 1, dtype=torch.int64, device=device)
        else:
            block.routed_counts = None


def routing_counts(model: nn.Module) -> dict[str, list[int]]:
    """Per block: routed pairs per expert plus dropped pairs (last entry) since tracking started. The counts
    only grow, so readers (a /metrics scrape) take differences; reading them is the one host synchronisation,
    made when asked, never by the layers."""
    return {name: block.routed_counts.tolist() for name, block in moe_blocks(model) if block.routed_counts is not None}


def install_health_check(model: nn.Module) -> None:
    blocks = moe_blocks(model)
    health = RouterHealth([name for name, _ in blocks])
    for index, (_, block) in enumerate(blocks):
        block.health = (health, index)
    if getattr(model, "_tessera_health_hook", None) is not None:
        model._tessera_health_hook.remove()
    model._tessera_health_hook = model.register_forward_hook(lambda module, args, output: health.raise_if_bad())

"""What a model family adapter knows: where the MoE blocks are, how to build our block from one, and a tiny
config for tests and demos. Adding a family is one file that defines a `Family` and registers it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from engine.moe.layer import MoEBlock


@dataclass
class Family:
    name: str
    model_types: tuple[str, ...]
    block_classes: tuple[str, ...]  # class names of the Hugging Face sparse-MLP modules we replace
    convert: Callable[[nn.Module, object, str, str | None], MoEBlock]  # (hf_block, config, backend, capacity)
    tiny_config: Callable[..., object]
    auto_class: str = "AutoModelForCausalLM"
    description: str = ""
    uses_experts_interface: bool = False  # its experts go through transformers' ExpertsInterface
    options: dict = field(default_factory=dict)

    def find_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
        """(qualified name, parent, attribute, block) for every sparse-MLP block in the model."""
        found = []
        for name, module in model.named_modules():
            for attr, child in module.named_children():
                if type(child).__name__ in self.block_classes:
                    found.append((f"{name}.{attr}" if name else attr, module, attr, child))
        return found


def check_shape(tensor: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{what} has shape {tuple(tensor.shape)} but the config implies {tuple(expected)}: "
                         "the weights do not match the model config")

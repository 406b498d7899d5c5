"""What a model family adapter knows: where the MoE blocks are, how to build our block from one, how its
checkpoints name the experts on disk, and a tiny config for tests and demos. Adding a family is one file that
defines a `Family`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.moe.layer import MoEBlock


@dataclass
class Family:
    name: str  # also the Hugging Face `model_type` it claims
    block_classes: tuple[str, ...]  # class names of the Hugging Face sparse-MLP modules we replace
    convert: Callable[[nn.Module, object, str, str | None], MoEBlock] | None  # (hf_block, config, backend, capacity)
    tiny_config: Callable[..., object] | None
    auto_class: str = "AutoModelForCausalLM"  # the model class when neither the entry nor config.json names one
    uses_experts_interface: bool = False  # its experts go through transformers' ExpertsInterface
    # On disk, under a block's prefix: expert i's (first, second, gate-partner) matrices, shaped (F, H), (H, F),
    # (F, H), with `{i}` for the expert ...
    expert_keys: tuple[str, str, str | None] | None = None
    # ... or, for checkpoints that stack all experts in one tensor per matrix, the names of w1 (E, F, H),
    # w2 (E, H, F) and the biases b1 (E, F), b2 (E, H).
    stacked_keys: dict[str, str] | None = None
    name_aliases: tuple[tuple[str, str], ...] = ()  # (in-memory, on-disk) name fragments that differ

    @property
    def is_dense(self) -> bool:
        return not self.block_classes

    def find_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
        """(qualified name, parent, attribute, block) for every sparse-MLP block in the model."""
        found = []
        for name, module in model.named_modules():
            for attr, child in module.named_children():
                if type(child).__name__ in self.block_classes:
                    found.append((f"{name}.{attr}" if name else attr, module, attr, child))
        return found

    def checkpoint_names(self, model_name: str) -> list[str]:
        """The names a model tensor may have on disk: its own, then with each alias applied."""
        return [model_name] + [f".{model_name}".replace(ours, theirs)[1:] for ours, theirs in self.name_aliases]


def tiny(config_class, **defaults) -> Callable[..., object]:
    """A family's `tiny_config`: `config_class` (or the transformers class of that name) with small defaults."""
    def build(**overrides):
        import transformers

        cls = getattr(transformers, config_class) if isinstance(config_class, str) else config_class
        return cls(**{**defaults, **overrides})

    return build


def check_shape(tensor: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{what} has shape {tuple(tensor.shape)} but the config implies {tuple(expected)}: "
                         "the weights do not match the model config")

"""Model families tessera can patch, keyed by name (the Hugging Face `model_type`), and `patch_moe`.

Every module of this package that defines `FAMILY` is registered: adding a family is adding one file. Families
defined elsewhere register with `register_family`. A model type that no family claims is `dense`.
"""
from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from engine.families.base import Family
from engine.families.dense import DENSE
from engine.moe.experts import check_backend, default_backend
from engine.moe.layer import MoEBlock
from engine.moe.patch import install_health_check, model_device

FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _family = getattr(importlib.import_module(f"{__name__}.{_info.name}"), "FAMILY", None)
    if _family is not None:
        register_family(_family)


def family_for(config_or_name) -> Family:
    """The family for a family name (its `model_type`) or a config object; `dense` for a config whose model
    type no family claims."""
    if not isinstance(config_or_name, str):
        return FAMILIES.get(getattr(config_or_name, "model_type", None), DENSE)
    if config_or_name == DENSE.name:
        return DENSE
    if config_or_name not in FAMILIES:
        raise ValueError(f"unknown family {config_or_name!r}: tessera knows {sorted(FAMILIES)} and {DENSE.name!r}")
    return FAMILIES[config_or_name]


def patch_moe(model: nn.Module, *, backend: str | None = None, capacity: str | None = None,
              family: Family | None = None) -> nn.Module:
    """Replace the model's MoE blocks with tessera's and return the model (a dense model is returned as is).

    `backend`: "triton", "torch", "reference" or "eager" (leave the Hugging Face modules alone); default triton
    on CUDA, torch on CPU. `capacity`: None (dropless, every token reaches its experts) or "hf" (the installed
    transformers' per-sequence expert capacity, where the family has one). `family`: default, the config's.
    """
    family = family or family_for(model.config)
    device = model_device(model)
    backend = check_backend(backend or default_backend(device), device)
    if backend == "eager" or family.is_dense:
        return model
    blocks = family.find_blocks(model)
    if not blocks and not any(isinstance(m, MoEBlock) for m in model.modules()):
        raise ValueError(f"no {family.block_classes} blocks found in {type(model).__name__}")
    for _, parent, attr, block in blocks:
        setattr(parent, attr, family.convert(block, model.config, backend, capacity))
    install_health_check(model)
    return model


__all__ = ["DENSE", "FAMILIES", "Family", "family_for", "patch_moe", "register_family"]

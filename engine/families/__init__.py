"""Model families tessera can patch, keyed by name and by Hugging Face `model_type`.

Every module of this package that defines `FAMILY` is registered: adding a family is adding one file. Families
defined elsewhere register with `register_family`.
"""
from __future__ import annotations

import importlib
import pkgutil

from engine.families.base import Family

FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _family = getattr(importlib.import_module(f"{__name__}.{_info.name}"), "FAMILY", None)
    if _family is not None:
        register_family(_family)


def family_for(config_or_name) -> Family:
    """The family for a family name, a `model_type`, or a config object."""
    key = config_or_name if isinstance(config_or_name, str) else getattr(config_or_name, "model_type", None)
    if key in FAMILIES:
        return FAMILIES[key]
    for family in FAMILIES.values():
        if key in family.model_types:
            return family
    raise ValueError(f"unsupported architecture {key!r}: tessera knows the MoE families "
                     f"{sorted(f for fam in FAMILIES.values() for f in fam.model_types)}")


__all__ = ["FAMILIES", "Family", "family_for", "register_family"]

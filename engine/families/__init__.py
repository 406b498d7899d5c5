"""Model families tessera can patch, keyed by name and by Hugging Face `model_type`."""
from __future__ import annotations

from engine.families.base import Family
from engine.families import bert_moe, mixtral, olmoe, qwen2_moe, qwen3_moe, switch

FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


for _module in (switch, mixtral, qwen2_moe, qwen3_moe, olmoe, bert_moe):
    register_family(_module.FAMILY)


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

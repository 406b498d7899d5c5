"""Parameter-space composition through PEFT: one merged adapter for a fixed set of weights.

The per-row mixture serves many weightings in one batch; when every request uses the same weights (or for
an offline export), PEFT's `add_weighted_adapter` builds a single adapter instead. With
combination_type="cat" the merged adapter equals the output-space mixture exactly, which the tests use as
the oracle for the kernel path.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from engine.lora.adapters import AdapterPool
from engine.lora.errors import AdapterError


def peft_weighted_model(model: nn.Module, pool: AdapterPool, weights: Mapping[str, float],
                        combination_type: str = "cat", name: str = "weighted"):
    """Wrap `model` (modified in place, as PEFT does) with the pool's adapters in `weights` and activate one
    adapter merged with `combination_type`. Returns the PeftModel."""
    from peft import PeftModel

    if not weights:
        raise AdapterError("peft_weighted_model needs at least one adapter weight")
    names = list(weights)
    peft_model = PeftModel.from_pretrained(model, str(pool.spec(names[0]).path), adapter_name=names[0])
    for other in names[1:]:
        peft_model.load_adapter(str(pool.spec(other).path), adapter_name=other)
    peft_model.add_weighted_adapter(names, [float(weights[n]) for n in names], name,
                                    combination_type=combination_type)
    peft_model.set_adapter(name)
    return peft_model.eval()

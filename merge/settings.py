"""Parameters that vary per tensor and per model, as mergekit writes them.

A setting is a scalar, a gradient (a list of numbers, interpolated over the layers: the first value at
layer 0, the last at the last layer), or a list of `{filter, value}` entries tried in order, where the
first entry whose `filter` is a substring of the tensor name (or is absent / `*`) gives the value. Tensors
outside the numbered layers (embeddings, final norm, head) read a gradient at its start, as mergekit does."""
from __future__ import annotations

import re

LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|resblocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_fraction(name: str, n_layers: int) -> float:
    """Where a tensor sits in the stack, 0 (first layer, or not in a layer) to 1 (last layer)."""
    i = layer_index(name)
    if i is None or n_layers <= 1:
        return 0.0
    return i / (n_layers - 1)


def count_layers(names) -> int:
    found = [i for i in map(layer_index, names) if i is not None]
    return max(found) + 1 if found else 0


def evaluate(setting, name: str, t: float):
    """The value of `setting` for tensor `name` at depth `t`; None when no filter matches."""
    if isinstance(setting, dict) and "value" in setting:
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if setting and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if setting and all(not isinstance(v, (list, dict)) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    for entry in setting:
        if not isinstance(entry, dict) or "value" not in entry:
            raise ValueError(f"a parameter list must hold numbers or {{filter, value}} entries, got {entry!r}")
        f = entry.get("filter")
        if f is None or f == "*" or (name and f in name):
            return evaluate(entry["value"], name, t)
    return None


def varies(setting) -> bool:
    """Whether a setting can take different values on different tensors."""
    return isinstance(setting, (list, dict))

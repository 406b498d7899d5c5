"""DARE then task arithmetic (Yu et al., 2024), mergekit's `dare_linear`: drop each entry of every task
vector with probability 1 − `density`, rescale the kept ones, then θ_0 + λ · Σ_k w_k τ̃_k.

mergekit's defaults: `density` 1.0, `normalize` false, `rescale` true (L1 norm kept). `rescale: density`
divides by `density` (the paper's and PEFT's `dare_linear`). DARE is also a preprocessing step for any
other method through the common `dare: <density>` parameter."""
from __future__ import annotations

from merge.methods import Context, drop_density, register
from merge.mixing import mix_all


@register("dare_linear", defaults={"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": True,
                                   "int8_mask": False}, prepare=drop_density, by_rows=True)
def dare_linear(dropped, ctx: Context):
    return mix_all(dropped, ctx, None)

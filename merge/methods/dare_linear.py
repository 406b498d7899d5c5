"""DARE then task arithmetic (Yu et al., 2024; mergekit's `dare_linear`): drop each entry of every task
vector with probability 1 − `density`, rescale the kept ones by 1/`density`, then θ_0 + λ · Σ_k w_k τ̃_k.

DARE is also a preprocessing step for any other method through the common `dare: <density>` parameter."""
from __future__ import annotations

from merge.methods import Context, MergeResult, drop_density, register, weighted


@register("dare_linear", defaults={"density": 0.5, "lambda": 1.0}, prepare=drop_density)
def dare_linear(dropped, ctx: Context) -> MergeResult:
    return MergeResult({n: float(ctx.params["lambda"]) * weighted(t, ctx.weights).sum(0) for n, t in dropped.items()})

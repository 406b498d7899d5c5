"""Weighted averaging of task vectors: θ_0 + Σ_k w_k τ_k / Σ_k w_k, i.e. the weighted mean of the models.

Registered as `linear` (mergekit's name) and `average` (the FlexMerge paper's)."""
from __future__ import annotations

from merge.methods import Context, MergeResult, register, weighted


def _average(tvs, ctx: Context) -> MergeResult:
    total = float(ctx.weights.sum())
    if total == 0.0:
        raise ValueError("linear/average: the weights of the group sum to zero")
    return MergeResult({n: weighted(t, ctx.weights).sum(0) / total for n, t in tvs.items()})


register("linear")(_average)
register("average")(_average)

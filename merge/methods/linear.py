"""Weighted averaging (Wortsman et al., 2022, model soups), mergekit's `linear`: Σ_k w_k θ_k / Σ_k w_k,
which is θ_0 + Σ_k w_k τ_k / Σ_k w_k. `normalize: false` (mergekit's option) gives the plain weighted
sum Σ_k w_k θ_k.

Registered as `linear` (mergekit's name) and `average` (the FlexMerge paper's)."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register, weighted_sum


def coefficients(ctx: Context) -> torch.Tensor | None:
    if not ctx.params.get("normalize", True):
        return None
    total = float(ctx.weights.sum())
    if total == 0.0:
        raise ValueError("linear/average: the weights of the group sum to zero")
    return ctx.weights / total


def _average(tvs, ctx: Context) -> MergeResult:
    c = coefficients(ctx)
    if c is not None:
        return MergeResult({n: weighted_sum(t, c) for n, t in tvs.items()})
    extra = float(ctx.weights.sum()) - 1.0  # Σ w θ_k = θ_0 + Σ w τ_k + (Σ w − 1) θ_0
    return MergeResult({n: weighted_sum(t, ctx.weights) + extra * ctx.base[n].float() for n, t in tvs.items()})


register("linear", defaults={"normalize": True}, coefficients=coefficients, by_rows=True)(_average)
register("average", coefficients=coefficients, by_rows=True)(_average)

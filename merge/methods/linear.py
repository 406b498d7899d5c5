"""Weighted averaging of task vectors: θ_0 + Σ_k w_k τ_k / Σ_k w_k, i.e. the weighted mean of the models.

Registered as `linear` (mergekit's name) and `average` (the FlexMerge paper's)."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register, weighted


def coefficients(ctx: Context) -> torch.Tensor:
    total = float(ctx.weights.sum())
    if total == 0.0:
        raise ValueError("linear/average: the weights of the group sum to zero")
    return ctx.weights / total


def _average(tvs, ctx: Context) -> MergeResult:
    c = coefficients(ctx)
    return MergeResult({n: weighted(t, c).sum(0) for n, t in tvs.items()})


register("linear", coefficients=coefficients)(_average)
register("average", coefficients=coefficients)(_average)

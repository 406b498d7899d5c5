"""Task arithmetic (Ilharco et al., 2023): θ_0 + λ · Σ_k w_k τ_k, as in the paper and in mergekit.

`normalize: true` divides by Σ w_k (mergekit's option): λ times the weighted mean. That is how the
FlexMerge reference scales a group, so one λ fits groups of every size; the default stays mergekit's
(false), which gives mergekit's output for a mergekit config."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register, weighted_sum


def coefficients(ctx: Context) -> torch.Tensor:
    scale = float(ctx.params["lambda"])
    if ctx.params["normalize"]:
        total = float(ctx.weights.sum())
        scale /= total if abs(total) >= 1e-8 else 1.0
    return scale * ctx.weights


@register("task_arithmetic", defaults={"lambda": 1.0, "normalize": False, "int8_mask": False}, coefficients=coefficients, by_rows=True)
def task_arithmetic(tvs, ctx: Context) -> MergeResult:
    c = coefficients(ctx)
    return MergeResult({n: weighted_sum(t, c) for n, t in tvs.items()})

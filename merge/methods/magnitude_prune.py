"""Magnitude pruning then task arithmetic (PEFT's `magnitude_prune`): keep each task's top-`density`
magnitudes, then θ_0 + λ · Σ_k w_k τ̃_k."""
from __future__ import annotations

from merge.methods import Context, MergeResult, register, weighted
from merge.sparsify import trim


@register("magnitude_prune", defaults={"density": 0.2, "lambda": 1.0, "scope": "tensor"})
def magnitude_prune(tvs, ctx: Context) -> MergeResult:
    p = ctx.params
    trimmed = trim(tvs, float(p["density"]), p["scope"], ctx.thresholds)
    return MergeResult({n: float(p["lambda"]) * weighted(t, ctx.weights).sum(0) for n, t in trimmed.items()})

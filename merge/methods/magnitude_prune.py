"""Magnitude pruning then task arithmetic (PEFT's `magnitude_prune`): keep each task's top-`density`
magnitudes, then θ_0 + λ · Σ_k w_k τ̃_k."""
from __future__ import annotations

from merge.methods import Context, MergeResult, register, trim_tasks, weighted_sum


@register("magnitude_prune", defaults={"density": 0.2, "lambda": 1.0, "scope": "tensor", "tie_break": None}, prepare=trim_tasks, by_rows=True)
def magnitude_prune(trimmed, ctx: Context) -> MergeResult:
    return MergeResult({n: float(ctx.params["lambda"]) * weighted_sum(t, ctx.weights) for n, t in trimmed.items()})

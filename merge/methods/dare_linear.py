"""DARE then task arithmetic (Yu et al., 2024; mergekit's `dare_linear`): drop each entry of every task
vector with probability 1 − `density`, rescale the kept ones by 1/`density`, then θ_0 + λ · Σ_k w_k τ̃_k.

DARE is also a preprocessing step for any other method through the common `dare: <density>` parameter."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register, weighted
from merge.sparsify import drop_and_rescale


@register("dare_linear", defaults={"density": 0.5, "lambda": 1.0})
def dare_linear(tvs, ctx: Context) -> MergeResult:
    p = ctx.params
    density, lam = float(p["density"]), float(p["lambda"])
    out = {}
    for n, t in tvs.items():
        dropped = torch.stack([drop_and_rescale(t[k], density, ctx.rng(k, n)) for k in range(t.shape[0])])
        out[n] = lam * weighted(dropped, ctx.weights).sum(0)
    return MergeResult(out)

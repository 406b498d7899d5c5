"""Iso-C (Marczak et al., 2025, "No task left behind: isotropic model merging").

For every matrix, take the task-arithmetic sum M = Σ_k w_k τ_k = U S Vᵀ and flatten its spectrum:
σ̄ U Vᵀ with σ̄ the mean singular value, so no task's directions are drowned by the dominant ones;
scaled by λ. Non-matrix tensors use the plain task-arithmetic sum."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register, weighted


@register("iso_c", defaults={"lambda": 1.0})
def iso_c(tvs, ctx: Context) -> MergeResult:
    lam = float(ctx.params["lambda"])
    out = {}
    for n, t in tvs.items():
        m = weighted(t, ctx.weights).sum(0)
        if m.dim() == 2:
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            m = s.mean() * (u @ vh)
        out[n] = lam * m
    return MergeResult(out)

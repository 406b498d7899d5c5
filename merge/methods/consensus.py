"""TALL masks and Consensus merging (Wang et al., 2024, "Localizing task information...").

With τ_MTL = Σ_k w_k τ_k, task k's TALL mask keeps the entries where it dominates the others:
m_k = |τ_k| ≥ `tall_lambda` · |τ_MTL − τ_k|.
- `tall_masks` stores τ_MTL once plus one bit mask per task (a modulator): task k is θ_0 + λ · m_k ⊙ τ_MTL.
- `consensus` keeps only entries that at least `k` tasks' masks select, dropping "selfish" and
  "catastrophic" weights, and returns the parameter-only model θ_0 + λ · τ_MTL ⊙ [Σ_k m_k ≥ k]."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register, weighted


def tall(t: torch.Tensor, weights: torch.Tensor, tall_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = weighted(t, weights)
    mtl = w.sum(0)
    masks = w.abs() >= tall_lambda * (mtl.unsqueeze(0) - w).abs()
    return mtl, masks


@register("tall_masks", defaults={"tall_lambda": 0.4, "lambda": 1.0}, masks=True)
def tall_masks(tvs, ctx: Context) -> MergeResult:
    lam, tl = float(ctx.params["lambda"]), float(ctx.params["tall_lambda"])
    vector, masks = {}, {}
    for n, t in tvs.items():
        mtl, m = tall(t, ctx.weights, tl)
        vector[n], masks[n] = lam * mtl, m
    return MergeResult(vector, masks=masks)


@register("consensus", defaults={"k": 2, "tall_lambda": 0.4, "lambda": 1.0}, by_rows=True)
def consensus(tvs, ctx: Context) -> MergeResult:
    lam, tl, k = float(ctx.params["lambda"]), float(ctx.params["tall_lambda"]), int(ctx.params["k"])
    out = {}
    for n, t in tvs.items():
        mtl, m = tall(t, ctx.weights, tl)
        out[n] = lam * mtl * (m.sum(0) >= k)
    return MergeResult(out)

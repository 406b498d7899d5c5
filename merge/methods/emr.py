"""EMR-Merging (Huang et al., 2024): Elect, Mask, Rescale.

Elect a unified vector: per entry the sign of Σ_k τ_k and the largest magnitude among the tasks that
share it. Each task then gets a bit mask (where its own sign agrees with the unified vector) and a
scalar rescaler, Σ|τ_k| / Σ|m_k ⊙ τ_uni|, so its rebuilt vector keeps its original mass. The paper takes
the sums over the whole model; here over the block (`scope: block`, the unit FlexMerge shares) or per
tensor (`scope: tensor`)."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register, weighted


@register("emr", defaults={"scope": "block"}, masks=True, scales=True)
def emr(tvs, ctx: Context) -> MergeResult:
    if ctx.params["scope"] not in ("block", "tensor"):
        raise ValueError(f"emr: scope must be 'block' or 'tensor', got {ctx.params['scope']!r}")
    vector, masks, scales, kept_all, mass_all = {}, {}, {}, 0.0, 0.0
    for n, t in tvs.items():
        w = weighted(t, ctx.weights)
        sign = torch.where(w.sum(0) >= 0, 1.0, -1.0)
        agree = w.sign() == sign
        unified = sign * (w.abs() * agree).max(0).values
        m = (w * unified) > 0
        kept = (m * unified).abs().reshape(m.shape[0], -1).sum(1)
        mass = w.abs().reshape(m.shape[0], -1).sum(1)
        scales[n] = torch.where(kept > 0, mass / kept.clamp(min=1e-30), torch.zeros_like(mass))
        kept_all, mass_all = kept_all + kept, mass_all + mass
        vector[n], masks[n] = unified, m
    if ctx.params["scope"] == "block":
        block_scale = torch.where(kept_all > 0, mass_all / kept_all.clamp(min=1e-30), torch.zeros_like(mass_all))
        scales = {n: block_scale.clone() for n in scales}
    return MergeResult(vector, masks=masks, scales=scales)

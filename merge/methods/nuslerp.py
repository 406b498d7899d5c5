"""mergekit's `nuslerp`: slerp of two task vectors around the base, θ_0 + slerp(t, τ_a, τ_b), with
t = w_b / (w_a + w_b) from the models' weights (0.5 when they sum to zero). `nuslerp_flatten: true`
takes one angle per tensor; false one per row (`nuslerp_row_wise: true`: per column of the rows).
`nuslerp_on_weights: true` interpolates the models themselves instead (mergekit without `base_model`).
Groups of exactly two models."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register


def nuslerp(t: float, a: torch.Tensor, b: torch.Tensor, dim: int = -1, flatten: bool = True, eps: float = 1e-8) -> torch.Tensor:
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif dim != -1:
        a, b = a.transpose(dim, -1), b.transpose(dim, -1)
    au = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    bu = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((au * bu).sum(-1, keepdim=True).clamp(-1, 1))
    s = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / s
    out = torch.where(s.abs() < eps, (1 - t) * a + t * b, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@register("nuslerp", defaults={"nuslerp_flatten": True, "nuslerp_row_wise": False, "nuslerp_on_weights": False})
def nuslerp_method(tvs, ctx: Context) -> MergeResult:
    p = ctx.params
    w = [float(x) for x in ctx.weights]
    if len(w) != 2:
        raise ValueError(f"nuslerp merges exactly two models, this group has {len(w)}")
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    dim = 0 if p["nuslerp_row_wise"] else -1
    out = {}
    for n, tv in tvs.items():
        if p["nuslerp_on_weights"]:
            base = ctx.base[n].float()
            out[n] = nuslerp(t, base + tv[0], base + tv[1], dim, bool(p["nuslerp_flatten"])) - base
        else:
            out[n] = nuslerp(t, tv[0], tv[1], dim, bool(p["nuslerp_flatten"]))
    return MergeResult(out)

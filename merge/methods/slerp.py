"""Spherical linear interpolation of two models (mergekit's `slerp`): θ = sin((1−t)Ω)/sin Ω · θ_a +
sin(tΩ)/sin Ω · θ_b, with Ω the angle between the two flattened tensors; nearly colinear tensors
(|cos Ω| > 0.9995) are interpolated linearly. θ_a is the group's first task (mergekit's `base_model`),
`t` is mergekit's parameter (0 gives θ_a). Groups of exactly two models."""
from __future__ import annotations

import math

import torch

from merge.methods import Context, MergeResult, register


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, colinear: float = 0.9995, eps: float = 1e-8,
          chunk: int = 1 << 16) -> torch.Tensor:
    """In float64, a chunk at a time (no tensor-sized float64 copies), into one output of a's dtype."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    na = math.sqrt(sum(float(fa[i : i + chunk].double().square().sum()) for i in range(0, fa.numel(), chunk)))
    nb = math.sqrt(sum(float(fb[i : i + chunk].double().square().sum()) for i in range(0, fb.numel(), chunk)))
    ua, ub = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = sum(float((fa[i : i + chunk].double() / ua * (fb[i : i + chunk].double() / ub)).sum()) for i in range(0, fa.numel(), chunk))
    if abs(dot) > colinear:
        ca, cb = 1 - t, t
    else:
        omega = math.acos(dot)
        ca, cb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    out = torch.empty_like(fa)
    for i in range(0, fa.numel(), chunk):
        out[i : i + chunk] = ca * fa[i : i + chunk].double() + cb * fb[i : i + chunk].double()
    return out.view(a.shape)


@register("slerp", defaults={"t": None})
def slerp_method(tvs, ctx: Context) -> MergeResult:
    t = ctx.params["t"]
    if t is None:
        raise ValueError("slerp needs the interpolation parameter `t` (0 keeps the first model, 1 the second)")
    out = {}
    for n, tv in tvs.items():
        if tv.shape[0] != 2:
            raise ValueError(f"slerp merges exactly two models, this group has {tv.shape[0]}")
        base = ctx.base[n].float()
        out[n] = slerp(float(t), base + tv[0], base + tv[1]).sub_(base)
    return MergeResult(out)

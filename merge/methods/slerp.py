"""Spherical linear interpolation of two models (mergekit's `slerp`): θ = sin((1−t)Ω)/sin Ω · θ_a +
sin(tΩ)/sin Ω · θ_b, with Ω the angle between the two flattened tensors; nearly colinear tensors
(|cos Ω| > 0.9995) are interpolated linearly. θ_a is the group's first task (mergekit's `base_model`),
`t` is mergekit's parameter (0 gives θ_a). Groups of exactly two models."""
from __future__ import annotations

import math

import torch

from merge.methods import Context, MergeResult, register


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, colinear: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(), b64.norm()
    dot = float((a64 / (na if na > eps else 1.0) * (b64 / (nb if nb > eps else 1.0))).sum())
    if abs(dot) > colinear:
        return ((1 - t) * a64 + t * b64).to(a.dtype)
    omega = math.acos(dot)
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s * a64 + math.sin(t * omega) / s * b64).to(a.dtype)


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
        out[n] = slerp(float(t), base + tv[0], base + tv[1]) - base
    return MergeResult(out)

"""Spherical linear interpolation of two models (mergekit's `slerp`): θ = sin((1−t)Ω)/sin Ω · θ_a +
sin(tΩ)/sin Ω · θ_b, with Ω the angle between the two flattened tensors; nearly colinear tensors
(|cos Ω| > 0.9995) are interpolated linearly. θ_a is the group's first task (mergekit's `base_model`),
`t` is mergekit's parameter (0 gives θ_a). Groups of exactly two models."""
from __future__ import annotations

import math

import torch

from merge.methods import Context, MergeResult, register


def slerp(t: float, base: torch.Tensor, da: torch.Tensor, db: torch.Tensor, colinear: float = 0.9995,
          eps: float = 1e-8, chunk: int = 1 << 16) -> torch.Tensor:
    """slerp of θ_a = base + da and θ_b = base + db, minus base. In float64 a chunk at a time, so besides the
    float32 output nothing tensor-sized is made."""
    fl = [x.reshape(-1) for x in (base, da, db)]
    spans = [(i, i + chunk) for i in range(0, fl[0].numel(), chunk)]

    def ends(i, j):  # θ_a and θ_b of one chunk, rounded to float32 first as whole tensors would be
        return (fl[0][i:j] + fl[1][i:j]).double(), (fl[0][i:j] + fl[2][i:j]).double()

    na = math.sqrt(sum(float(ends(i, j)[0].square().sum()) for i, j in spans))
    nb = math.sqrt(sum(float(ends(i, j)[1].square().sum()) for i, j in spans))
    ua, ub = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = sum(float((a / ua * (b / ub)).sum()) for a, b in (ends(i, j) for i, j in spans))
    if abs(dot) > colinear:
        ca, cb = 1 - t, t
    else:
        omega = math.acos(dot)
        ca, cb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    out = torch.empty_like(fl[0], dtype=torch.float32)
    for i, j in spans:
        a, b = ends(i, j)
        out[i:j] = (ca * a + cb * b).float() - fl[0][i:j]
    return out.view(base.shape)


@register("slerp", defaults={"t": None})
def slerp_method(tvs, ctx: Context) -> MergeResult:
    t = ctx.params["t"]
    if t is None:
        raise ValueError("slerp needs the interpolation parameter `t` (0 keeps the first model, 1 the second)")
    out = {}
    for n, tv in tvs.items():
        if tv.shape[0] != 2:
            raise ValueError(f"slerp merges exactly two models, this group has {tv.shape[0]}")
        out[n] = slerp(float(t), ctx.base[n].float(), tv[0], tv[1])
    return MergeResult(out)

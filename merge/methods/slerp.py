"""Spherical linear interpolation of two models (mergekit's `slerp`): θ = sin((1−t)Ω)/sin Ω · θ_a +
sin(tΩ)/sin Ω · θ_b, with Ω the angle between the two flattened tensors; nearly colinear tensors
(|cos Ω| > 0.9995) are interpolated linearly. θ_a is the group's first task (mergekit's `base_model`),
`t` is mergekit's parameter (0 gives θ_a). Groups of exactly two models."""
from __future__ import annotations

import math

import torch

from merge.methods import Context, MergeResult, register


def end_sums(da: torch.Tensor, db: torch.Tensor, base: torch.Tensor | None = None, chunk: int = 1 << 16) -> torch.Tensor:
    """[Σ a², Σ b², Σ a·b] in float64 for a = base + da, b = base + db (base omitted: 0), each end rounded to
    float32 first as whole tensors would be; a chunk at a time, so nothing tensor-sized is made. Sums over
    row ranges add up to the tensor's."""
    fl = [x.reshape(-1) for x in (da, db)]
    fb = None if base is None else base.reshape(-1)
    sums = torch.zeros(3, dtype=torch.float64)
    for i in range(0, fl[0].numel(), chunk):
        a, b = (x[i : i + chunk] if fb is None else fb[i : i + chunk] + x[i : i + chunk] for x in fl)
        a, b = a.double(), b.double()
        sums += torch.stack([a.square().sum(), b.square().sum(), (a * b).sum()]).cpu()
    return sums


def slerp(t: float, base: torch.Tensor, da: torch.Tensor, db: torch.Tensor, sums: torch.Tensor | None = None,
          colinear: float = 0.9995, eps: float = 1e-8, chunk: int = 1 << 16) -> torch.Tensor:
    """slerp of θ_a = base + da and θ_b = base + db, minus base, with the angle from `sums` (`end_sums` of
    the whole tensor; computed here when omitted). In float64 a chunk at a time, so besides the float32
    output nothing tensor-sized is made."""
    sa, sb, sab = (float(x) for x in (end_sums(da, db, base) if sums is None else sums))
    na, nb = math.sqrt(sa), math.sqrt(sb)
    ua, ub = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = sab / (ua * ub)
    if abs(dot) > colinear:
        ca, cb = 1 - t, t
    else:
        omega = math.acos(dot)
        ca, cb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    fl = [x.reshape(-1) for x in (base, da, db)]
    out = torch.empty_like(fl[0], dtype=torch.float32)
    for i in range(0, fl[0].numel(), chunk):
        a, b = ((fl[0][i : i + chunk] + x[i : i + chunk]).double() for x in fl[1:])
        out[i : i + chunk] = (ca * a + cb * b).float() - fl[0][i : i + chunk]
    return out.view(base.shape)


def _pairs(tvs, method: str) -> None:
    for tv in tvs.values():
        if tv.shape[0] != 2:
            raise ValueError(f"{method} merges exactly two models, this group has {tv.shape[0]}")


def slerp_sums(tvs, ctx: Context) -> dict[str, torch.Tensor]:
    _pairs(tvs, "slerp")
    return {n: end_sums(tv[0], tv[1], ctx.base[n].float()) for n, tv in tvs.items()}


@register("slerp", defaults={"t": None}, by_rows=True, stats=slerp_sums)
def slerp_method(tvs, ctx: Context) -> MergeResult:
    t = ctx.params["t"]
    if t is None:
        raise ValueError("slerp needs the interpolation parameter `t` (0 keeps the first model, 1 the second)")
    _pairs(tvs, "slerp")
    given = ctx.stats or {}
    return MergeResult({n: slerp(float(t), ctx.base[n].float(), tv[0], tv[1], given.get(n)) for n, tv in tvs.items()})

"""mergekit's `nuslerp`: slerp of two task vectors around the base, θ_0 + slerp(t, τ_a, τ_b), with
t = w_b / (w_a + w_b) from the models' weights (0.5 when they sum to zero). `nuslerp_flatten: true`
takes one angle per tensor; false one per row (`nuslerp_row_wise: true`: per column of the rows).
`nuslerp_on_weights: true` interpolates the models themselves instead (mergekit without `base_model`).
Groups of exactly two models."""
from __future__ import annotations

import math

import torch

from merge.methods import Context, MergeResult, register
from merge.methods.slerp import end_sums


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


def nuslerp_flat(t: float, da: torch.Tensor, db: torch.Tensor, base: torch.Tensor | None = None,
                 sums: torch.Tensor | None = None, eps: float = 1e-8, chunk: int = 1 << 16) -> torch.Tensor:
    """`nuslerp(..., flatten=True)` of a = base + da and b = base + db (base omitted: 0), minus base, a chunk
    at a time, with the one angle per tensor from `sums` (`end_sums` of the whole tensor; computed here
    when omitted): only the float32 output is tensor-sized."""
    sa, sb, dot = (float(x) for x in (end_sums(da, db, base) if sums is None else sums))
    cos = dot / (max(math.sqrt(sa), 1e-7) * max(math.sqrt(sb), 1e-7))
    theta = torch.tensor(math.acos(min(max(cos, -1.0), 1.0)), dtype=torch.float32)
    s = torch.sin(theta)
    fl = [x.reshape(-1) for x in (da, db)]
    fb = None if base is None else base.reshape(-1)
    out = torch.empty_like(fl[0])
    for i in range(0, fl[0].numel(), chunk):
        j = i + chunk
        a, b = (x[i:j] if fb is None else fb[i:j] + x[i:j] for x in fl)
        part = (1 - t) * a + t * b if abs(float(s)) < eps else (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / s
        out[i:j] = part if fb is None else part - fb[i:j]
    return out.view(da.shape)


def _weights_t(ctx: Context) -> float:
    w = [float(x) for x in ctx.weights]
    if len(w) != 2:
        raise ValueError(f"nuslerp merges exactly two models, this group has {len(w)}")
    return 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)


def nuslerp_sums(tvs, ctx: Context) -> dict[str, torch.Tensor]:
    """The flattened angle's sums (no whole-tensor statistic otherwise: rows have their own angles)."""
    _weights_t(ctx)
    if not ctx.params["nuslerp_flatten"]:
        return {}
    on_weights = ctx.params["nuslerp_on_weights"]
    return {n: end_sums(tv[0], tv[1], ctx.base[n].float() if on_weights else None) for n, tv in tvs.items()}


def _rows_apart(p: dict) -> bool:
    return bool(p["nuslerp_flatten"] or not p["nuslerp_row_wise"])  # row-wise angles span all rows of a column


@register("nuslerp", defaults={"nuslerp_flatten": True, "nuslerp_row_wise": False, "nuslerp_on_weights": False},
          by_rows=_rows_apart, stats=nuslerp_sums)
def nuslerp_method(tvs, ctx: Context) -> MergeResult:
    p = ctx.params
    t = _weights_t(ctx)
    dim = 0 if p["nuslerp_row_wise"] else -1
    given = ctx.stats or {}
    out = {}
    for n, tv in tvs.items():
        if p["nuslerp_flatten"]:
            out[n] = nuslerp_flat(t, tv[0], tv[1], ctx.base[n].float() if p["nuslerp_on_weights"] else None, given.get(n))
        elif p["nuslerp_on_weights"]:
            base = ctx.base[n].float()
            out[n] = nuslerp(t, base + tv[0], base + tv[1], dim, bool(p["nuslerp_flatten"])) - base
        else:
            out[n] = nuslerp(t, tv[0], tv[1], dim, bool(p["nuslerp_flatten"]))
    return MergeResult(out)

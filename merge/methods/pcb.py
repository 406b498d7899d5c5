"""PCB-Merging (Du et al., 2024): parameter competition balancing.

Per entry, an intra-task score (how large the entry is within its own task: exp(K · minmax(τ_k²))) times an
inter-task score (softmax over tasks of τ_k ⊙ Σ_j τ_j: how much the task agrees with the others). Each
task keeps only its top-`ratio` scores; the kept scores, min-max normalised per task, weight an average of
the task vectors, which is scaled by λ. The scores are normalised per tensor (`scope: tensor`) or over the
whole block (`scope: block`); a per-task softmax denominator is dropped because the min-max cancels it."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register, weighted


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp(min=1e-12)


def pcb_flat(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """PCB on task vectors flattened to `[K, n]`; returns the merged vector `[n]` (before λ)."""
    K, n = x.shape
    intra = torch.exp(K * _minmax(x * x))
    inter = torch.softmax(x * x.sum(0, keepdim=True), dim=0)
    score = intra * inter
    keep = max(1, int(round(ratio * n)))
    floor = torch.topk(score, keep, dim=1).values[:, -1:]
    scale = _minmax(torch.maximum(score, floor))
    return (x * scale).sum(0) / scale.sum(0).clamp(min=1e-12)


@register("pcb", defaults={"ratio": 0.1, "lambda": 1.0, "scope": "block"})
def pcb(tvs, ctx: Context) -> MergeResult:
    p = ctx.params
    ratio, lam = float(p["ratio"]), float(p["lambda"])
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"pcb: ratio must be in (0, 1], got {ratio}")
    tvs = {n: weighted(t, ctx.weights) for n, t in tvs.items()}
    if p["scope"] == "tensor":
        return MergeResult({n: lam * pcb_flat(t.reshape(t.shape[0], -1), ratio).view(t.shape[1:]) for n, t in tvs.items()})
    if p["scope"] != "block":
        raise ValueError(f"pcb: scope must be 'tensor' or 'block', got {p['scope']!r}")
    names = list(tvs)
    K = tvs[names[0]].shape[0]
    merged = pcb_flat(torch.cat([tvs[n].reshape(K, -1) for n in names], dim=1), ratio)
    out, start = {}, 0
    for n in names:
        shape = tvs[n].shape[1:]
        size = tvs[n][0].numel()
        out[n] = lam * merged[start : start + size].view(shape)
        start += size
    return MergeResult(out)

"""PCB-Merging (Du et al., NeurIPS 2024): parameter competition balancing.

With Norm(x) the min-max normalisation of a task's entries to [0, 1] and the softmaxes taken over a
task's entries:
- intra-balancing β_intra,i = softmax(K · Norm(τ_i ⊙ τ_i)): how large an entry is within its task;
- inter-balancing β_inter,i = Σ_j softmax(Norm(τ_i ⊙ τ_j)): how much the task agrees with each task;
- β_i = β_intra,i ⊙ β_inter,i; each task keeps its top-`ratio` entries of β (β̂_i, the rest set to 0);
- merged τ = Σ_i β̂_i ⊙ τ_i / Σ_i β̂_i, scaled by λ.
Normalising before the softmaxes is what keeps them from being uniform: raw products of fine-tuning
deltas are ~1e-6. The scores are computed per tensor (`scope: tensor`) or over the whole block
(`scope: block`)."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register, weighted


def _norm(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp(min=1e-30)


def pcb_scores(x: torch.Tensor) -> torch.Tensor:
    """β `[K, n]` for task vectors flattened to `[K, n]`."""
    K = x.shape[0]
    intra = torch.softmax(K * _norm(x * x), dim=-1)
    inter = torch.zeros_like(x)
    for j in range(K):
        inter += torch.softmax(_norm(x * x[j : j + 1]), dim=-1)
    return intra * inter


def pcb_flat(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """PCB on `[K, n]`; returns the merged vector `[n]` (before λ)."""
    n = x.shape[1]
    score = pcb_scores(x.double())
    keep = max(1, int(ratio * n))
    floor = torch.topk(score, keep, dim=1).values[:, -1:]
    kept = torch.where(score >= floor, score, torch.zeros_like(score))
    merged = (x.double() * kept).sum(0) / kept.sum(0).clamp(min=1e-300)
    return merged.to(x.dtype)


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
        size = tvs[n][0].numel()
        out[n] = lam * merged[start : start + size].view(tvs[n].shape[1:])
        start += size
    return MergeResult(out)

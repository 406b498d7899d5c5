"""TIES-Merging (Yadav et al., 2023): trim each task vector to its top-`density` magnitudes, elect a sign
per entry, average only the entries that agree with it (disjoint mean), scale by λ.

`dare_ties` (mergekit's name) replaces the magnitude trim by DARE's random drop-and-rescale. Signs are
elected on the weighted vectors and the disjoint mean divides by the agreeing weights, as mergekit does;
with equal weights this is exactly PEFT's `ties`/`dare_ties`."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, drop_density, register, trim_tasks, weighted


def elect_and_merge(t: torch.Tensor, weights: torch.Tensor, sign_method: str, normalize: bool) -> torch.Tensor:
    """Sign election and disjoint mean over dim 0 of already-sparsified task vectors."""
    w = weighted(t, weights)
    if sign_method == "total":
        votes = w.sum(0)
    elif sign_method == "frequency":
        votes = w.sign().sum(0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    majority = torch.where(votes >= 0, 1.0, -1.0)
    agree = w.sign() == majority
    merged = (w * agree).sum(0)
    if not normalize:
        return merged
    divisor = weighted(agree.to(t.dtype), weights).sum(0)
    return merged / torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)


_DEFAULTS = {"density": 0.2, "lambda": 1.0, "majority_sign_method": "total", "normalize": True}


def _elect(sparse, ctx: Context) -> MergeResult:
    p = ctx.params
    lam = float(p["lambda"])
    return MergeResult(
        {n: lam * elect_and_merge(t, ctx.weights, p["majority_sign_method"], p["normalize"]) for n, t in sparse.items()}
    )


register("ties", defaults={**_DEFAULTS, "scope": "tensor"}, prepare=trim_tasks)(_elect)
register("dare_ties", defaults=_DEFAULTS, prepare=drop_density)(_elect)

"""Sparsification shared by several algorithms: magnitude trimming (per tensor, per block or global) and
DARE's random drop with rescale. `scope` follows the two conventions in use: mergekit trims each tensor
(`tensor`), the TIES paper trims each task vector as a whole (`global`); `block` trims within a block."""
from __future__ import annotations

import torch

SCOPES = ("tensor", "block", "global")


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `int(density * numel)` largest magnitudes of one task's tensor (PEFT's and mergekit's rule)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if density >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    flat = x.abs().reshape(-1)
    k = int(density * flat.numel())
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    # Selecting the k-th largest value is about twice as fast as sorting; only ties at that value need the
    # sort to keep exactly k entries, and a descending argsort breaks them as mergekit does.
    mask = flat >= torch.kthvalue(flat, flat.numel() - k + 1).values
    if int(mask.sum()) != k:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.argsort(flat.float(), descending=True)[:k]] = True
    return mask.view(x.shape)


def trim(tvs: dict[str, torch.Tensor], density: float, scope: str, thresholds: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Zero all but the top-`density` magnitudes of every task, within the chosen scope."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "tensor":
        return {n: torch.stack([t[k] * topk_mask(t[k], density) for k in range(t.shape[0])]) for n, t in tvs.items()}
    if scope == "global":
        if thresholds is None:
            raise RuntimeError("scope: global needs per-task thresholds from the statistics pass")
        out = {}
        for n, t in tvs.items():
            thr = thresholds.to(t).view(-1, *([1] * (t.dim() - 1)))
            out[n] = t * (t.abs() >= thr)
        return out
    names = list(tvs)
    K = tvs[names[0]].shape[0]
    flat = torch.cat([tvs[n].reshape(K, -1) for n in names], dim=1)
    mask = torch.stack([topk_mask(flat[k], density) for k in range(K)])
    out, start = {}, 0
    for n in names:
        size = tvs[n][0].numel()
        out[n] = tvs[n] * mask[:, start : start + size].view(tvs[n].shape)
        start += size
    return out


def magnitude_histogram(t: torch.Tensor) -> torch.Tensor:
    """Per-row counts of |x| bucketed by the top 16 bits of its float32 pattern (a bf16 bucket).

    For non-negative floats the bit pattern is monotone in the value, so summing these histograms over
    every tensor of a model gives each task's global magnitude quantiles in one streaming pass."""
    K = t.shape[0]
    keys = (t.reshape(K, -1).abs().float().view(torch.int32) >> 16).long()
    keys += torch.arange(K, device=t.device).view(-1, 1) * 32768
    return torch.bincount(keys.view(-1), minlength=K * 32768).view(K, 32768)


def threshold_from_histogram(hist: torch.Tensor, density: float) -> torch.Tensor:
    """Per task, the lower edge of the bucket holding the k-th largest magnitude (k = density · count).

    Keeping `|x| >= edge` keeps the top-k plus at most the rest of that one bf16-wide bucket."""
    total = hist.sum(dim=1)
    k = (density * total.double()).long().clamp(min=1)
    from_top = hist.flip(1).cumsum(1)
    idx_from_top = (from_top >= k.view(-1, 1)).int().argmax(dim=1)
    bucket = 32767 - idx_from_top
    return (bucket.to(torch.int32) << 16).view(torch.float32)


def drop_and_rescale(x: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and divide the kept ones by `density`."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"DARE density must be in (0, 1], got {density}")
    if density == 1.0:
        return x
    # drawn on the CPU generator (same stream on any device), then moved next to x
    keep = torch.bernoulli(torch.full(x.shape, density), generator=generator).to(x.device)
    return x * keep / density


def outliers_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, 2024): drop the top `gamma` fraction of magnitudes (outliers)
    and then the smallest, keeping `int(density * numel)` entries. When the two cuts overlap, fewer outliers
    are dropped so the count is met."""
    n = x.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = x.abs().reshape(-1).float().argsort()
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    mask[order[bottom : n - top]] = True
    return mask.view(x.shape)


def della_keep_probabilities(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al., 2024) as mergekit parameterises it: within each row, entries ranked by
    magnitude get keep probabilities spread linearly from `density − epsilon` (smallest) to
    `density + epsilon` (largest)."""
    if not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise ValueError(f"della: density ± epsilon must lie in (0, 1), got density {density}, epsilon {epsilon}")
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    ranks = rows.abs().float().argsort(dim=1).argsort(dim=1).float()
    width = max(rows.shape[1] - 1, 1)
    return ((density - epsilon) + ranks / width * 2 * epsilon).view(x.shape)

"""Sparsification shared by several algorithms: magnitude trimming (per tensor, per block or global), Model
Breadcrumbs' outlier cut, DARE's and DELLA's random drops with rescale. `scope` follows the two conventions
in use: mergekit trims each tensor (`tensor`), the TIES paper trims each task vector as a whole (`global`);
`block` trims within a block.

Everything here works in place on one task's tensor and in column chunks, so a block's task vectors are
the only block-sized buffers a merge holds. Which entries tie at a cut matters for matching mergekit
exactly: it ranks magnitudes with torch's CPU `argsort`, which is `std::sort` (an unstable introsort):
equal magnitudes come out in an order that depends on the whole tensor, not on their indices, so no rule
on indices reproduces it. When magnitudes tie at the cut, the same sort is run here, in place on the
tensor (see `keep_sorted_range_`), at about 4 × the tensor's bytes. `tie_break: index` keeps the tied
entries of lowest index instead: the same count, the same values, no sort, and so within the memory bound."""
from __future__ import annotations

import numpy as np
import torch

SCOPES = ("tensor", "block", "global")
CHUNK = 1 << 18


def _chunks(n: int, size: int = CHUNK):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def keep_sorted_range_(x: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """Zero `x` (1-D, in place) except the entries at positions [start, stop) of torch's sort of |x|.

    On CPU float32 the sort runs in place on `x` itself, with the int64 positions as the only extra
    buffer: |x| is sorted, the kept range's (position, magnitude) pairs are packed into those int64s,
    then `x` is zeroed and refilled from them, and the signs, kept aside as bits, are put back. Peak
    extra memory: 2 × x (the positions) + x / 32 (the signs), where sorting a copy takes 3 ×."""
    n = x.numel()
    if start >= stop:
        return x.zero_()
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or n >= 1 << 31:
        order = torch.sort(x.abs().float(), descending=descending).indices
        keep = torch.zeros(n, dtype=torch.bool, device=x.device)
        keep[order[start:stop]] = True
        return x.mul_(keep)
    values = x.numpy()
    signs = np.empty((n + 7) // 8, dtype=np.uint8)
    for a, b in _chunks(n, CHUNK):  # CHUNK is a multiple of 8: chunks start on a byte
        signs[a // 8 : (b + 7) // 8] = np.packbits(np.signbit(values[a:b]))
    x.abs_()
    positions = torch.empty(n, dtype=torch.int64)
    torch.sort(x, descending=descending, out=(x, positions))  # the same permutation as argsort(|x|)
    bits = x.view(torch.int32)
    for a, b in _chunks(stop - start):
        part = positions[start + a : start + b]
        part.bitwise_or_(bits[start + a : start + b].long() << 32)  # |x| < 2^31 as bits, positions < 2^31
    x.zero_()
    for a, b in _chunks(stop - start):
        part = positions[start + a : start + b]
        x[part & 0xFFFFFFFF] = (part >> 32).int().view(torch.float32)
    del positions
    for a, b in _chunks(n, CHUNK):
        negative = torch.from_numpy(np.unpackbits(signs[a // 8 : (b + 7) // 8], count=b - a).view(np.bool_))
        x[a:b].mul_(1.0 - 2.0 * negative)
    return x


TIE_BREAKS = ("mergekit", "index")


def magnitude_trim_(x: torch.Tensor, density: float, tie_break: str = "mergekit", at_least_one: bool = False) -> torch.Tensor:
    """Zero, in place, all but the `int(density * numel)` largest magnitudes of one task's tensor (PEFT's rule;
    `at_least_one`: never fewer than one, mergekit's). Among equal magnitudes at the cut, `tie_break` picks
    which survive: "mergekit" the ones mergekit's argsort keeps (that needs torch's sort of the tensor,
    about 4 × the tensor's bytes, when such ties exist), "index" the lowest indices (no tensor-sized
    buffer besides the selection's one copy)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    flat = x.view(-1)
    n = flat.numel()
    if density >= 1.0 or n == 0:
        return x
    if density == 0.0:
        return x.zero_()
    k = max(int(density * n), 1 if at_least_one else 0)
    if k == 0:
        return x.zero_()
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        # the k-th largest by numpy's in-place selection in one copy (kthvalue would hold about three)
        scratch = np.abs(flat.numpy())
        scratch.partition(n - k)
        kth = float(scratch[n - k])
        del scratch
    else:
        kth = float(torch.kthvalue(flat.abs().float(), n - k + 1).values)
    above = at_least = 0
    for a, b in _chunks(n):  # one pass: how many are above the cut, and how many reach it
        magnitude = flat[a:b].abs()
        above += int((magnitude > kth).sum())
        at_least += int((magnitude >= kth).sum())
    if at_least != k and tie_break == "mergekit":  # which of the tied survive is the sort's choice
        return keep_sorted_range_(flat, 0, k, descending=True).view(x.shape)
    ties_kept = k - above  # the first `ties_kept` entries equal to the k-th, in index order
    for a, b in _chunks(n):
        part = flat[a:b]
        magnitude = part.abs()
        keep = magnitude > kth
        if ties_kept > 0:
            tied = (magnitude == kth).nonzero().view(-1)[:ties_kept]
            keep[tied] = True
            ties_kept -= tied.numel()
        part.mul_(keep)
    return x


def trim(tvs: dict[str, torch.Tensor], density: float, scope: str, thresholds: torch.Tensor | None,
         tie_break: str = "mergekit", at_least_one: bool = False) -> dict[str, torch.Tensor]:
    """Zero all but the top-`density` magnitudes of every task, within the chosen scope (in place for
    `tensor` and `global`); `tie_break` and `at_least_one` as in `magnitude_trim_`."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "tensor":
        for t in tvs.values():
            for k in range(t.shape[0]):
                magnitude_trim_(t[k], density, tie_break, at_least_one)
        return tvs
    if scope == "global":
        if thresholds is None:
            raise RuntimeError("scope: global needs per-task thresholds from the statistics pass")
        for t in tvs.values():
            for k in range(t.shape[0]):
                flat, thr = t[k].view(-1), float(thresholds[k])
                for a, b in _chunks(flat.numel()):
                    flat[a:b].mul_(flat[a:b].abs() >= thr)
        return tvs
    names = list(tvs)
    K = tvs[names[0]].shape[0]
    flat = torch.cat([tvs[n].reshape(K, -1) for n in names], dim=1)
    for k in range(K):
        magnitude_trim_(flat[k], density, tie_break, at_least_one)
    out, start = {}, 0
    for n in names:
        size = tvs[n][0].numel()
        out[n] = flat[:, start : start + size].reshape(tvs[n].shape)
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


def l1(x: torch.Tensor) -> float:
    """Σ |x| without a tensor-sized temporary."""
    flat = x.reshape(-1)
    return float(sum(flat[a:b].abs().sum(dtype=torch.float64) for a, b in _chunks(flat.numel())))


def bernoulli_keep_(x: torch.Tensor, p: float | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`x ⊙ bernoulli(p)` in place, drawn in chunks on the CPU `generator` in element order: the same
    draws as one `torch.bernoulli` over the whole tensor, which is also what mergekit's drops take from
    torch's global generator. `torch.bernoulli` on CPU keeps an entry where one uniform float32, drawn from
    the generator's 32-bit stream, is below p; drawing those with `uniform_` and comparing gives the same
    entries at a quarter of the time (tested). `p` is a float or a tensor like `x`."""
    flat = x.view(-1)
    probs = None if isinstance(p, (int, float)) else p.reshape(-1)
    draws = torch.empty(min(CHUNK, flat.numel()))
    limit = torch.tensor(float(p), dtype=torch.float32) if probs is None else None
    for a, b in _chunks(flat.numel()):
        u = draws[: b - a].uniform_(generator=generator)
        keep = u < (limit if probs is None else probs[a:b].cpu().float())
        flat[a:b].mul_(keep.to(x.device))
    return x


def rescaled_(x: torch.Tensor, sparsify, rescale, density: float) -> torch.Tensor:
    """`sparsify(x)` (in place), then the kept entries rescaled in place: `True`/`"l1"` back to the L1 norm
    `x` had (mergekit's `rescale`), `"density"` divided by the keep probability (the DARE paper's and
    PEFT's), `False`: as they are."""
    if not (rescale in (None, "density", "l1") or isinstance(rescale, bool)):
        raise ValueError(f"rescale must be true (L1, mergekit's), 'density' (1/density, DARE's) or false, got {rescale!r}")
    before = l1(x) if rescale is True or rescale == "l1" else 0.0
    kept = sparsify(x)
    if rescale == "density":
        return kept.div_(density)
    if rescale is True or rescale == "l1":
        after = l1(kept)
        if before >= 1e-7 and after >= 1e-7:
            kept.mul_(torch.tensor(before / after, dtype=torch.float64).to(kept.dtype))
    return kept


def drop_and_rescale_(x: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and divide the kept ones by `density` (in place)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"DARE density must be in (0, 1], got {density}")
    if density == 1.0:
        return x
    return bernoulli_keep_(x, density, generator).div_(density)


def outliers_trim_(x: torch.Tensor, density: float, gamma: float, tie_break: str = "mergekit") -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, 2024), in place: drop the top `gamma` fraction of magnitudes
    (outliers) and then the smallest, keeping `int(density * numel)` entries; when the two cuts overlap,
    fewer outliers are dropped so the count is met. The ranks are an ascending sort of |x|: mergekit's
    unstable one (`tie_break: mergekit`; sorted only where magnitudes tie at a cut) or a stable one
    (`index`: equal magnitudes ranked in index order; no sort, one copy for the selection)."""
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    flat = x.view(-1)
    n = flat.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    stop = bottom + keep
    if keep <= 0:
        return x.zero_()
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        scratch = np.abs(flat.numpy())
        scratch.partition([bottom, stop - 1])
        lo, hi = float(scratch[bottom]), float(scratch[stop - 1])
        del scratch
    else:
        magnitude = flat.abs().float()
        lo, hi = (float(torch.kthvalue(magnitude, r + 1).values) for r in (bottom, stop - 1))
        del magnitude
    below, up_to_hi = dict.fromkeys((lo, hi), 0), 0
    for a, b in _chunks(n):  # one pass: how many lie below each cut value, and how many reach the upper one
        magnitude = flat[a:b].abs()
        for v in below:
            below[v] += int((magnitude < v).sum())
        up_to_hi += int((magnitude <= hi).sum())
    if tie_break == "mergekit" and (below[lo] != bottom or up_to_hi != stop):  # ties straddle a cut
        return keep_sorted_range_(flat, bottom, stop, descending=False).view(x.shape)
    # Entries strictly between the two cut values are kept; those equal to one take the ranks from
    # below[v] on, in index order, and are kept where that rank falls in [bottom, stop).
    seen = dict.fromkeys(below, 0)
    for a, b in _chunks(n):
        part = flat[a:b]
        magnitude = part.abs()
        kept = (magnitude > lo) & (magnitude < hi)
        for v, first in below.items():
            tied = (magnitude == v).nonzero().view(-1)
            ranks = torch.arange(tied.numel(), device=x.device) + (first + seen[v])
            kept[tied[(ranks >= bottom) & (ranks < stop)]] = True
            seen[v] += tied.numel()
        part.mul_(kept)
    return x


def _check_della(density: float, epsilon: float) -> None:
    if not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise ValueError(f"della: density ± epsilon must lie in (0, 1), got density {density}, epsilon {epsilon}")


def della_keep_probabilities(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al., 2024) as mergekit parameterises it: within each row (dim 0; a 1-D
    tensor is one row), entries ranked by magnitude get keep probabilities spread linearly from
    `density − epsilon` (smallest) to `density + epsilon` (largest). The ranks come from an ascending sort
    of |row| (mergekit's argsort) and its inverse permutation."""
    _check_della(density, epsilon)
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    order = torch.argsort(rows.abs().float(), dim=1)
    count = torch.arange(rows.shape[1], dtype=torch.float32, device=x.device).expand_as(order)
    ranks = torch.empty(rows.shape, dtype=torch.float32, device=x.device).scatter_(1, order, count)
    width = max(rows.shape[1] - 1, 1)
    return ((density - epsilon) + ranks / width * 2 * epsilon).view(x.shape)


def della_drop_(x: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """MagPrune's drops on one task's tensor, in place, a few rows at a time (rows along dim 0, a 1-D tensor
    is one row), drawn in element order as one `bernoulli` over the whole tensor's probabilities would be."""
    if x.dim() > 2:  # ranks along dim 1, as mergekit takes them, for the whole tensor at once
        _check_della(density, epsilon)
        ranks = x.abs().float().argsort(dim=1).argsort(dim=1).float()
        return bernoulli_keep_(x, (density - epsilon) + ranks / max(x.shape[1] - 1, 1) * 2 * epsilon, generator)
    rows = x.view(1, -1) if x.dim() < 2 else x
    step = max(1, CHUNK // max(rows.shape[1], 1))  # whole rows, about CHUNK entries at a time
    for a, b in _chunks(rows.shape[0], step):
        bernoulli_keep_(rows[a:b], della_keep_probabilities(rows[a:b], density, epsilon), generator)
    return x

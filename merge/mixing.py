"""The last step of the task-arithmetic family (mergekit's "generalized task arithmetic"): weight the
sparsified task vectors, optionally keep only the entries that agree with an elected sign, sum, optionally
divide by the weights that contributed, scale by λ.

Used by task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs(_ties), della(_linear); the methods
differ only in how they sparsify and in their defaults."""
from __future__ import annotations

import torch

from merge.methods import weighted

# PEFT's names and mergekit's for the same two rules
SIGN_RULES = {"total": "total", "sum": "total", "frequency": "frequency", "count": "frequency"}


def majority_mask(w: torch.Tensor, rule: str) -> torch.Tensor:
    """`[K, ...]` bool: entries whose sign equals the elected sign (by summed value, or by sign count)."""
    if rule not in SIGN_RULES:
        raise ValueError(f"majority_sign_method must be one of {sorted(SIGN_RULES)}, got {rule!r}")
    votes = w.sum(0) if SIGN_RULES[rule] == "total" else w.sign().sum(0)
    return w.sign() == torch.where(votes >= 0, 1.0, -1.0)


def mix(t: torch.Tensor, weights: torch.Tensor, *, sign_rule: str | None, normalize: bool, lam: float,
        chunk: int = 1 << 16) -> torch.Tensor:
    """λ · Σ_k w_k m_k τ_k [/ Σ_k w_k m_k], with m_k the sign-agreement mask (all ones without `sign_rule`).

    A zero divisor becomes 1, as in mergekit (an entry no task touched stays at the base). Computed in
    column chunks into one output, so no `[K, ...]` temporary is made; each column sums over k in order,
    as one whole-tensor sum over dim 0 does."""
    K = t.shape[0]
    flat = t.reshape(K, -1)
    out = torch.empty(flat.shape[1], dtype=t.dtype, device=t.device)
    w = weights.to(t.dtype).view(-1, 1)
    total = weights.to(t.dtype).sum()
    total = torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start : start + chunk] * w
        if sign_rule is None:
            merged, divisor = part.sum(0), total
        else:
            agree = majority_mask(part, sign_rule)
            merged = (part * agree).sum(0)
            divisor = (agree.to(t.dtype) * w).sum(0)
            divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        if normalize:
            merged = merged / divisor
        torch.mul(merged, lam, out=out[start : start + chunk])
    return out.view(t.shape[1:])


def mix_all(sparse: dict[str, torch.Tensor], ctx, sign_rule: str | None):
    from merge.methods import MergeResult

    p = ctx.params
    return MergeResult({n: mix(t, ctx.weights, sign_rule=sign_rule, normalize=bool(p["normalize"]), lam=float(p["lambda"]))
                        for n, t in sparse.items()})

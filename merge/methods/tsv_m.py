"""TSV-Merge (Gargiulo et al., 2025, Task Singular Vectors).

For every matrix: keep each task's top `sv_reduction` fraction of singular triplets (default 1/K),
concatenate the U's, S's and V's of all tasks, remove the interference between tasks by replacing the
concatenated U and V with their nearest orthogonal matrices (U ← P Qᵀ for U = P Σ Qᵀ), and rebuild
U_⊥ diag(S) V_⊥ᵀ, scaled by λ. Vectors and other non-matrix tensors are averaged, as in the paper."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register, weighted


def _orthogonal(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_matrix(t: torch.Tensor, fraction: float) -> torch.Tensor:
    K = t.shape[0]
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    keep = max(1, int(s.shape[1] * fraction))
    U = torch.cat([u[k, :, :keep] for k in range(K)], dim=1)
    S = torch.cat([s[k, :keep] for k in range(K)])
    V = torch.cat([vh[k, :keep, :].T for k in range(K)], dim=1)
    return _orthogonal(U) @ torch.diag(S) @ _orthogonal(V).T


@register("tsv_m", defaults={"lambda": 1.0, "sv_reduction": None})
def tsv_m(tvs, ctx: Context) -> MergeResult:
    lam = float(ctx.params["lambda"])
    out = {}
    for n, t in tvs.items():
        w = weighted(t, ctx.weights)
        fraction = ctx.params["sv_reduction"] or 1.0 / w.shape[0]
        out[n] = lam * (tsv_matrix(w, float(fraction)) if w.dim() == 3 else w.mean(0))
    return MergeResult(out)

"""TSV-Merge (Gargiulo et al., 2025, Task Singular Vectors).

For every matrix: keep each task's top `sv_reduction` fraction of singular triplets (default 1/K),
concatenate the U's, S's and V's of all tasks, remove the interference between tasks by replacing the
concatenated U and V with their nearest orthogonal matrices (U ← P Qᵀ for U = P Σ Qᵀ), and rebuild
U_⊥ diag(S) V_⊥ᵀ, scaled by λ. Vectors and other non-matrix tensors are averaged, as in the paper.

Each task's SVD does not depend on its group, so it is the `prepare` step: computed once per block and
carried as `name::U`, `name::S`, `name::Vh` rows; a group then only orthogonalises its concatenation.
"""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register, weighted

_FACTORS = ("::U", "::S", "::Vh")


def _orthogonal(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def task_svds(tvs, ctx: Context) -> dict[str, torch.Tensor]:
    out = {}
    for n, t in tvs.items():
        w = weighted(t, ctx.weights)
        if w.dim() == 3:
            out[n + "::U"], out[n + "::S"], out[n + "::Vh"] = torch.linalg.svd(w, full_matrices=False)
        else:
            out[n] = w
    return out


def tsv_from_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, fraction: float) -> torch.Tensor:
    K = u.shape[0]
    keep = max(1, int(s.shape[1] * fraction))
    U = torch.cat([u[k, :, :keep] for k in range(K)], dim=1)
    S = torch.cat([s[k, :keep] for k in range(K)])
    V = torch.cat([vh[k, :keep, :].T for k in range(K)], dim=1)
    return _orthogonal(U) @ torch.diag(S) @ _orthogonal(V).T


@register("tsv_m", defaults={"lambda": 1.0, "sv_reduction": None}, prepare=task_svds)
def tsv_m(prepared, ctx: Context) -> MergeResult:
    lam = float(ctx.params["lambda"])
    out = {}
    for key, t in prepared.items():
        if key.endswith(_FACTORS[1:]):
            continue
        if key.endswith("::U"):
            n = key[: -len("::U")]
            fraction = ctx.params["sv_reduction"] or 1.0 / t.shape[0]
            out[n] = lam * tsv_from_factors(t, prepared[n + "::S"], prepared[n + "::Vh"], float(fraction))
        else:
            out[key] = lam * t.mean(0)
    return MergeResult(out)

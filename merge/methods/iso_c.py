"""Iso-C and Iso-CTS (Marczak et al., 2025, "No task left behind: isotropic model merging").

Iso-C: for every matrix, take the task-arithmetic sum M = Σ_k w_k τ_k = U S Vᵀ and flatten its spectrum:
σ̄ U Vᵀ with σ̄ the mean singular value, so no task's directions are drowned by the dominant ones.
Iso-CTS: keep the top `common_space_fraction` of M's singular directions as a common subspace, give
each task an equal share of the rest from the part of its own τ_k outside that subspace, orthogonalise
the concatenated bases (nearest orthogonal matrix), and use the mean of all kept singular values.
Both scale by λ. Non-matrix tensors (biases, norms) take the plain mean λ · Σ_k w_k τ_k / K, as the
reference does; `exclude_embeddings: true` treats token/position embeddings the same way instead of
taking their SVD."""
from __future__ import annotations

import re

import torch

from merge.methods import Context, MergeResult, register, weighted

EMBEDDING = re.compile(r"(?:^|\.)(?:embed\w*|wte|wpe|shared|token_embedding|position_embedding)\b")


def _orthogonal(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def iso_c_matrix(m: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts_matrix(w: torch.Tensor, fraction: float) -> torch.Tensor:
    """`w` `[K, out, in]`, already weighted."""
    K = w.shape[0]
    r = min(w.shape[1:])
    common = int(r * fraction)
    per_task = round((r - common) / K)
    common = r - per_task * K
    if common < 0:  # more tasks than leftover directions: one direction each, the rest common
        per_task, common = (r // K), r - (r // K) * K
    u, s, vh = torch.linalg.svd(w.sum(0), full_matrices=False)
    uc, sc, vc = u[:, :common], s[:common], vh[:common]
    us, ss, vs = [uc], [sc], [vc]
    for k in range(K):
        outside = w[k] - uc @ (uc.T @ w[k])
        uk, sk, vk = torch.linalg.svd(outside, full_matrices=False)
        us.append(uk[:, :per_task])
        ss.append(sk[:per_task])
        vs.append(vk[:per_task])
    U, S, V = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0)
    return S.mean() * (_orthogonal(U) @ _orthogonal(V.T).T)


def _merge(tvs, ctx: Context, matrix) -> MergeResult:
    lam = float(ctx.params["lambda"])
    skip_embeddings = bool(ctx.params["exclude_embeddings"])
    out = {}
    for n, t in tvs.items():
        w = weighted(t, ctx.weights)
        if w.dim() == 3 and not (skip_embeddings and EMBEDDING.search(n)):
            out[n] = lam * matrix(w)
        else:
            out[n] = lam * w.mean(0)
    return MergeResult(out)


@register("iso_c", defaults={"lambda": 1.0, "exclude_embeddings": False})
def iso_c(tvs, ctx: Context) -> MergeResult:
    return _merge(tvs, ctx, lambda w: iso_c_matrix(w.sum(0)))


@register("iso_cts", defaults={"lambda": 1.0, "common_space_fraction": 0.8, "exclude_embeddings": False})
def iso_cts(tvs, ctx: Context) -> MergeResult:
    fraction = float(ctx.params["common_space_fraction"])
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"iso_cts: common_space_fraction must be in [0, 1], got {fraction}")
    return _merge(tvs, ctx, lambda w: iso_cts_matrix(w, fraction))

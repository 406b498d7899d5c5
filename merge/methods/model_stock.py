"""Model Stock (Jang et al., 2024), mergekit's `model_stock`: move from the base towards the average of
the N fine-tuned models by t = N cos θ / (1 + (N − 1) cos θ), where cos θ is the mean pairwise cosine of
their task vectors: θ = θ_0 + t · mean_k τ_k. `filter_wise: true` takes one angle per row instead of one
per tensor (vectors are one row). Needs at least two models in a group."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register


def _check(t: torch.Tensor) -> None:
    if t.shape[0] < 2:
        raise ValueError("model_stock needs at least two fine-tuned models")


def gram(t: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """The task vectors' Gram matrix in float64 over column chunks (no tensor-sized temporary); sums over
    row ranges add up to the tensor's."""
    flat = t.reshape(t.shape[0], -1)
    out = torch.zeros((t.shape[0],) * 2, dtype=torch.float64, device=t.device)
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start : start + chunk].double()
        out += part @ part.T
    return out


def _one_angle(t: torch.Tensor, filter_wise: bool) -> bool:
    return not (filter_wise and t.dim() > 1)


def stock(t: torch.Tensor, filter_wise: bool, g: torch.Tensor | None = None, chunk: int = 1 << 16) -> torch.Tensor:
    """One angle per tensor from the Gram matrix `g` (of the whole tensor; computed here when omitted), then
    the scaled mean a chunk at a time, so only the output is tensor-sized; `filter_wise`: one per row."""
    _check(t)
    K = t.shape[0]
    if not _one_angle(t, filter_wise):
        rows = t.reshape(K, -1, t.shape[-1])
        norms = rows.norm(dim=-1)
        cos = [((rows[i] * rows[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(K) for j in range(i + 1, K)]
        c = torch.stack(cos).mean(0).unsqueeze(-1)
        return (K * c / (1 + (K - 1) * c) * rows.mean(0)).reshape(t.shape[1:])
    g = gram(t) if g is None else g
    norms = g.diagonal().sqrt()
    cos = [min(max(float(g[i, j] / max(float(norms[i] * norms[j]), 1e-6)), -1.0), 1.0) for i in range(K) for j in range(i + 1, K)]
    c = sum(cos) / len(cos)
    ratio = K * c / (1 + (K - 1) * c)
    flat = t.reshape(K, -1)
    out = torch.empty(flat.shape[1], dtype=t.dtype, device=t.device)
    for start in range(0, flat.shape[1], chunk):
        torch.mul(flat[:, start : start + chunk].mean(0), ratio, out=out[start : start + chunk])
    return out.view(t.shape[1:])


def grams(tvs, ctx: Context) -> dict[str, torch.Tensor]:
    out = {}
    for n, t in tvs.items():
        _check(t)
        if _one_angle(t, bool(ctx.params["filter_wise"])):
            out[n] = gram(t)
    return out


@register("model_stock", defaults={"filter_wise": False}, by_rows=True, stats=grams)
def model_stock(tvs, ctx: Context) -> MergeResult:
    # model stock weighs all models equally; `weight` is not part of the method
    given = ctx.stats or {}
    return MergeResult({n: stock(t, bool(ctx.params["filter_wise"]), given.get(n)) for n, t in tvs.items()})

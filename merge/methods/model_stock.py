"""Model Stock (Jang et al., 2024), mergekit's `model_stock`: move from the base towards the average of
the N fine-tuned models by t = N cos θ / (1 + (N − 1) cos θ), where cos θ is the mean pairwise cosine of
their task vectors: θ = θ_0 + t · mean_k τ_k. `filter_wise: true` takes one angle per row instead of one
per tensor (vectors are one row). Needs at least two models in a group."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register


def stock(t: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    K = t.shape[0]
    if K < 2:
        raise ValueError("model_stock needs at least two fine-tuned models")
    rows = t.reshape(K, -1, t.shape[-1]) if filter_wise and t.dim() > 1 else t.reshape(K, 1, -1)
    norms = rows.norm(dim=-1)
    cos = [((rows[i] * rows[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
           for i in range(K) for j in range(i + 1, K)]
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    ratio = K * c / (1 + (K - 1) * c)
    return (ratio * rows.mean(0)).reshape(t.shape[1:])


@register("model_stock", defaults={"filter_wise": False})
def model_stock(tvs, ctx: Context) -> MergeResult:
    # model stock weighs all models equally; `weight` is not part of the method
    return MergeResult({n: stock(t, bool(ctx.params["filter_wise"])) for n, t in tvs.items()})

"""Model Stock (Jang et al., 2024), mergekit's `model_stock`: move from the base towards the average of
the N fine-tuned models by t = N cos θ / (1 + (N − 1) cos θ), where cos θ is the mean pairwise cosine of
their task vectors: θ = θ_0 + t · mean_k τ_k. `filter_wise: true` takes one angle per row instead of one
per tensor (vectors are one row). Needs at least two models in a group."""
from __future__ import annotations

import torch

from merge.methods import Context, MergeResult, register


def stock(t: torch.Tensor, filter_wise: bool, chunk: int = 1 << 16) -> torch.Tensor:
    K = t.shape[0]
    if K < 2:
        raise ValueError("model_stock needs at least two fine-tuned models")
    if filter_wise and t.dim() > 1:
        rows = t.reshape(K, -1, t.shape[-1])
        norms = rows.norm(dim=-1)
        cos = [((rows[i] * rows[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(K) for j in range(i + 1, K)]
        c = torch.stack(cos).mean(0).unsqueeze(-1)
        return (K * c / (1 + (K - 1) * c) * rows.mean(0)).reshape(t.shape[1:])
    # one angle per tensor: the Gram matrix in float64 over column chunks, then the scaled mean a chunk at a
    # time, so only the output is tensor-sized
    flat = t.reshape(K, -1)
    gram = torch.zeros((K, K), dtype=torch.float64, device=t.device)
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start : start + chunk].double()
        gram += part @ part.T
    norms = gram.diagonal().sqrt()
    cos = [min(max(float(gram[i, j] / max(float(norms[i] * norms[j]), 1e-6)), -1.0), 1.0) for i in range(K) for j in range(i + 1, K)]
    c = sum(cos) / len(cos)
    ratio = K * c / (1 + (K - 1) * c)
    out = torch.empty(flat.shape[1], dtype=t.dtype, device=t.device)
    for start in range(0, flat.shape[1], chunk):
        torch.mul(flat[:, start : start + chunk].mean(0), ratio, out=out[start : start + chunk])
    return out.view(t.shape[1:])


@register("model_stock", defaults={"filter_wise": False})
def model_stock(tvs, ctx: Context) -> MergeResult:
    # model stock weighs all models equally; `weight` is not part of the method
    return MergeResult({n: stock(t, bool(ctx.params["filter_wise"])) for n, t in tvs.items()})

"""DELLA-Merging (Deep et al., 2024), mergekit's `della` and `della_linear`: random drops whose keep
probability grows with an entry's magnitude rank (MagPrune: from `density − epsilon` to
`density + epsilon` within each row), rescaled, then TIES's sign election (`della`) or task arithmetic
(`della_linear`).

mergekit's defaults: `density` 1.0 (nothing dropped), `epsilon` 0.15, `rescale` true (the kept entries
keep the tensor's L1 norm), `normalize` true for `della`, false for `della_linear`, `lambda` 1.0."""
from __future__ import annotations

import torch

from merge.methods import Context, register, rescaled
from merge.mixing import mix_all
from merge.sparsify import della_keep_probabilities


def magprune(tvs, ctx: Context):
    out = {}
    for n, t in tvs.items():
        rows = []
        for k in range(t.shape[0]):
            d = float(ctx.value("density", k))
            if d >= 1.0:
                rows.append(t[k])
                continue
            probs = della_keep_probabilities(t[k], d, float(ctx.value("epsilon", k)))
            keep = torch.bernoulli(probs.cpu(), generator=ctx.rng(k, n)).to(t.device)
            rows.append(rescaled(t[k], keep, ctx.params["rescale"], d))
        out[n] = torch.stack(rows)
    return out


_DEFAULTS = {"density": 1.0, "epsilon": 0.15, "lambda": 1.0, "rescale": True, "int8_mask": False}


@register("della", defaults={**_DEFAULTS, "normalize": True, "majority_sign_method": "total"}, prepare=magprune)
def della(sparse, ctx: Context):
    return mix_all(sparse, ctx, ctx.params["majority_sign_method"])


@register("della_linear", defaults={**_DEFAULTS, "normalize": False}, prepare=magprune)
def della_linear(sparse, ctx: Context):
    return mix_all(sparse, ctx, None)

"""DELLA-Merging (Deep et al., 2024), mergekit's `della` and `della_linear`: random drops whose keep
probability grows with an entry's magnitude rank (MagPrune: from `density − epsilon` to
`density + epsilon` within each row), rescaled, then TIES's sign election (`della`) or task arithmetic
(`della_linear`).

mergekit's defaults: `density` 1.0 (nothing dropped), `epsilon` 0.15, `rescale` true (the kept entries
keep the tensor's L1 norm), `normalize` true for `della`, false for `della_linear`, `lambda` 1.0."""
from __future__ import annotations

from merge.methods import Context, register
from merge.mixing import mix_all
from merge.sparsify import della_drop_, rescaled_


def magprune(tvs, ctx: Context):
    for n, t in tvs.items():
        for k in range(t.shape[0]):
            d = float(ctx.value("density", k))
            if d < 1.0:
                e, g = float(ctx.value("epsilon", k)), ctx.rng(k, n)
                rescaled_(t[k], lambda x: della_drop_(x, d, e, g), ctx.params["rescale"], d)
    return tvs


_DEFAULTS = {"density": 1.0, "epsilon": 0.15, "lambda": 1.0, "rescale": True, "int8_mask": False}


@register("della", defaults={**_DEFAULTS, "normalize": True, "majority_sign_method": "total"}, prepare=magprune, by_rows=True)
def della(sparse, ctx: Context):
    return mix_all(sparse, ctx, ctx.params["majority_sign_method"])


@register("della_linear", defaults={**_DEFAULTS, "normalize": False}, prepare=magprune, by_rows=True)
def della_linear(sparse, ctx: Context):
    return mix_all(sparse, ctx, None)

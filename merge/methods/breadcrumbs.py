"""Model Breadcrumbs (Davari & Belilovsky, 2024), mergekit's `breadcrumbs` and `breadcrumbs_ties`: per
task and tensor, drop the largest `gamma` fraction of magnitudes and the smallest ones down to `density`,
then task arithmetic (`breadcrumbs`) or TIES's sign election (`breadcrumbs_ties`).

mergekit's defaults: `density` 1.0 (nothing dropped), `gamma` 0.01, `normalize` false, `rescale` false.
One difference: for a tensor with fewer than 1/gamma entries mergekit's slice keeps nothing; here the
count `int(density · numel)` is kept whatever the size. `tie_break` (tessera's) chooses the ranking among
equal magnitudes, as for `ties`: "mergekit" (its sort's order, exact parity) or "index" (within the memory
bound); unset, "mergekit" for a fixed size and "index" for the size curve."""
from __future__ import annotations

from merge.methods import Context, register
from merge.mixing import mix_all
from merge.sparsify import outliers_trim_, rescaled_


def crumbs(tvs, ctx: Context):
    rule = ctx.params.get("tie_break") or "mergekit"
    for n, t in tvs.items():
        for k in range(t.shape[0]):
            d, g = float(ctx.value("density", k)), float(ctx.value("gamma", k))
            if d < 1.0:
                rescaled_(t[k], lambda x: outliers_trim_(x, d, g, rule), ctx.params["rescale"], d)
    return tvs


_DEFAULTS = {"density": 1.0, "gamma": 0.01, "lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False,
             "tie_break": None}


@register("breadcrumbs", defaults=_DEFAULTS, prepare=crumbs, by_rows=True)
def breadcrumbs(sparse, ctx: Context):
    return mix_all(sparse, ctx, None)


@register("breadcrumbs_ties", defaults={**_DEFAULTS, "majority_sign_method": "total"}, prepare=crumbs, by_rows=True)
def breadcrumbs_ties(sparse, ctx: Context):
    return mix_all(sparse, ctx, ctx.params["majority_sign_method"])

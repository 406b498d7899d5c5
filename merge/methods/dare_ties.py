"""DARE-TIES (Yu et al., 2024, with TIES's sign election), mergekit's `dare_ties`: drop each entry with
probability 1 − `density`, rescale the kept ones, elect signs, sum the agreeing entries, × λ.

mergekit's defaults: `density` 1.0, `normalize` false (a sum, not a mean, of the agreeing entries),
`rescale` true (the kept entries are scaled to the task vector's L1 norm). `rescale: density` divides by
`density` instead, as the DARE paper and PEFT do; with that and `normalize: true` this is PEFT's
`dare_ties`."""
from __future__ import annotations

from merge.methods import Context, drop_density, register
from merge.mixing import mix_all


@register("dare_ties", defaults={"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": True,
                                 "majority_sign_method": "total", "int8_mask": False}, prepare=drop_density, by_rows=True)
def dare_ties(dropped, ctx: Context):
    return mix_all(dropped, ctx, ctx.params["majority_sign_method"])

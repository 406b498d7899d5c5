"""TIES-Merging (Yadav et al., 2023): trim each task vector to its top-`density` magnitudes, elect a sign
per entry, average only the entries that agree with it (disjoint mean), scale by λ.

mergekit's name, parameters and defaults (`density` 1.0, `normalize` true, `lambda` 1.0): signs are elected
on the weighted vectors and the disjoint mean divides by the agreeing weights, so with equal weights this
is exactly PEFT's `ties`. `scope` (tensor, block, global) and `majority_sign_method` (total/sum or
frequency/count) are tessera's additions."""
from __future__ import annotations

from merge.methods import Context, register, trim_tasks
from merge.mixing import mix_all


@register("ties", defaults={"density": 1.0, "lambda": 1.0, "normalize": True, "majority_sign_method": "total",
                            "scope": "tensor", "int8_mask": False}, prepare=trim_tasks)
def ties(sparse, ctx: Context):
    return mix_all(sparse, ctx, ctx.params["majority_sign_method"])

"""TIES-Merging (Yadav et al., 2023): trim each task vector to its top-`density` magnitudes, elect a sign
per entry, average only the entries that agree with it (disjoint mean), scale by λ.

mergekit's name, parameters and defaults (`density` 1.0, `normalize` true, `lambda` 1.0): signs are elected
on the weighted vectors and the disjoint mean divides by the agreeing weights, so with equal weights this
is exactly PEFT's `ties`. `scope` (tensor, block, global) and `majority_sign_method` (total/sum or
frequency/count) are tessera's additions, and so is `tie_break`: which of equal magnitudes at the cut
survive, "mergekit" (its argsort's choice: exact parity, but a sort at ~4 × the tensor's bytes where such
ties exist) or "index" (the lowest indices: the memory bound holds). Unset, it is "mergekit" for a fixed
size and "index" for `size: all` (the FlexMerge curve). Like mergekit (not PEFT), a tensor keeps at least one entry."""
from __future__ import annotations

from merge.methods import Context, register, trim_tasks_mergekit
from merge.mixing import mix_all


@register("ties", defaults={"density": 1.0, "lambda": 1.0, "normalize": True, "majority_sign_method": "total",
                            "scope": "tensor", "int8_mask": False, "tie_break": None},
          prepare=trim_tasks_mergekit, by_rows=True)
def ties(sparse, ctx: Context):
    return mix_all(sparse, ctx, ctx.params["majority_sign_method"])

"""mergekit's `passthrough`: one model's tensors as they are, optionally multiplied by its `scale`.
A group of one model only (mergekit uses it to stack layer slices, which tessera does not do)."""
from __future__ import annotations

from merge.methods import Context, MergeResult, register


@register("passthrough", defaults={"scale": None}, singletons=True, by_rows=True)
def passthrough(tvs, ctx: Context) -> MergeResult:
    out = {}
    for n, tv in tvs.items():
        if tv.shape[0] != 1:
            raise ValueError(f"passthrough takes exactly one model, this group has {tv.shape[0]}")
        scale = ctx.value("scale", 0)
        out[n] = tv[0] if scale is None else float(scale) * (ctx.base[n].float() + tv[0]) - ctx.base[n].float()
    return MergeResult(out)

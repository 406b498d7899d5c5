"""Sum each token's top-k expert outputs back in token order.

Every pair wrote its own row, so the sum runs in a fixed order (choice 0, 1, ..., k-1) in fp32: the result is
deterministic, unlike an atomic scatter-add. Pairs whose expert id is outside `[0, num_experts)` (dropped, or
computed by another rank) count as zero, so their rows need never be written or cleared.
"""
from __future__ import annotations

import torch

from tessera_kernels import triton_importable

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["num_tokens", "num_experts", "top_k"])  # one compile per dtype and width
    def _combine_topk_kernel(
        pair_out_ptr, expert_ids_ptr, out_ptr, num_tokens, N, num_experts, top_k,
        stride_pm, stride_pn, stride_om, stride_on,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        token_ok = tokens < num_tokens
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for choice in range(0, top_k):
            pairs = tokens.to(tl.int64) * top_k + choice
            expert = tl.load(expert_ids_ptr + pairs, mask=token_ok, other=-1)
            ok = token_ok & (expert >= 0) & (expert < num_experts)
            rows = tl.load(pair_out_ptr + pairs[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                           mask=ok[:, None] & n_ok[None, :], other=0.0)
            acc += rows.to(tl.float32)
        out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & n_ok[None, :])


def combine_topk(pair_out: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`pair_out` is `(T * top_k, H)`, `expert_ids` is `(T, top_k)`; returns `(T, H)`."""
    num_tokens, top_k = expert_ids.shape
    n = pair_out.shape[1]
    out = torch.empty(num_tokens, n, dtype=out_dtype or pair_out.dtype, device=pair_out.device)
    block_t, block_n = 16, min(triton.next_power_of_2(n), 256)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(n, block_n))
    _combine_topk_kernel[grid](
        pair_out, expert_ids.contiguous(), out, num_tokens, n, num_experts, top_k,
        pair_out.stride(0), pair_out.stride(1), out.stride(0), out.stride(1),
        BLOCK_T=block_t, BLOCK_N=block_n,
    )
    return out


def combine_topk_reference(pair_out, expert_ids, num_experts, out_dtype=None):
    num_tokens, top_k = expert_ids.shape
    valid = ((expert_ids >= 0) & (expert_ids < num_experts)).reshape(-1, 1)
    rows = torch.where(valid, pair_out.float(), 0.0).view(num_tokens, top_k, pair_out.shape[-1])
    return rows.sum(1).to(out_dtype or pair_out.dtype)

"""The whole router of an MoE layer in one launch: logits (x Wᵀ + b), softmax, top-k, renormalisation, the
non-finite check and the per-expert routing counts.

At decode a layer's work is a handful of tiny kernels, so every launch counts: in plain torch the router alone is
about fifteen (GEMM, isfinite, all, softmax, topk, sum, div, casts, count updates). The arithmetic follows
`engine.moe.router.route` exactly: logits rounded to the activation dtype (or fp32 for Switch, whose router runs
in fp32), softmax in fp32, Switch's probabilities rounded to the activation dtype before its top-1, ties to the
lowest expert id. Only the summation order of the logits differs from cuBLAS, as between any two GEMMs.

The non-finite flag and the counts are written with atomics into device tensors that are read, if ever, outside
the layer: no host synchronisation, and every buffer is sized from shapes alone (CUDA-graph capturable).
"""
from __future__ import annotations

import torch

from tessera_kernels import triton_importable

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _route_kernel(
        x_ptr, w_ptr, b_ptr, ids_ptr, weights_ptr, counts_ptr, flag_ptr,
        num_tokens, H, E, stride_xt, stride_xh, stride_we, stride_wh,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, SWITCH: tl.constexpr,
        NORMALIZE: tl.constexpr, FP32_LOGITS: tl.constexpr, UPCAST: tl.constexpr, COUNT: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        experts = tl.arange(0, BLOCK_E)
        offs_h = tl.arange(0, BLOCK_H)
        token_ok = tokens < num_tokens
        expert_ok = experts < E
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + offs_h
            x = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * stride_xt + h[None, :] * stride_xh,
                        mask=token_ok[:, None] & (h[None, :] < H), other=0.0)
            w = tl.load(w_ptr + experts[None, :] * stride_we + h[:, None] * stride_wh,
                        mask=expert_ok[None, :] & (h[:, None] < H), other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if FP32_LOGITS:
                acc += tl.dot(x, w, input_precision="ieee")
            elif UPCAST:  # bf16 values are exact in tf32: the same products as a bf16 GEMM
                acc += tl.dot(x, w, input_precision="tf32")
            else:
                acc += tl.dot(x, w)
        if HAS_BIAS:
            acc += tl.load(b_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)[None, :]
        if not FP32_LOGITS:  # the logits tensor of the torch router is in the activation dtype
            acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
        valid = token_ok[:, None] & expert_ok[None, :]
        finite = (acc == acc) & (tl.abs(acc) < float("inf"))
        bad = tl.sum(tl.sum(tl.where(valid & ~finite, 1, 0), axis=1), axis=0)
        tl.atomic_max(flag_ptr, 1, mask=bad > 0)
        logits = tl.where(expert_ok[None, :], acc, float("-inf"))
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probs = shifted / tl.sum(shifted, axis=1)[:, None]
        if SWITCH:  # Switch takes its top-1 over probabilities rounded to the activation dtype
            probs = probs.to(weights_ptr.dtype.element_ty).to(tl.float32)
        probs = tl.where(expert_ok[None, :], probs, -1.0)
        slots = tl.arange(0, K_PAD)
        top_w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
        top_i = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(probs, axis=1)
            pick = tl.min(tl.where(probs == best[:, None], experts[None, :], BLOCK_E), axis=1)
            top_w = tl.where(slots[None, :] == j, best[:, None], top_w)
            top_i = tl.where(slots[None, :] == j, pick[:, None], top_i)
            probs = tl.where(experts[None, :] == pick[:, None], -1.0, probs)
        if NORMALIZE:
            top_w = top_w / tl.sum(top_w, axis=1)[:, None]
        out_ok = token_ok[:, None] & (slots[None, :] < TOP_K)
        pairs = tokens.to(tl.int64)[:, None] * TOP_K + slots[None, :]
        tl.store(ids_ptr + pairs, top_i.to(ids_ptr.dtype.element_ty), mask=out_ok)
        tl.store(weights_ptr + pairs, top_w.to(weights_ptr.dtype.element_ty), mask=out_ok)
        if COUNT:
            tl.atomic_add(counts_ptr + top_i, 1, mask=out_ok)


def fused_route(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int, *,
                switch: bool, normalize: bool, weights_dtype: torch.dtype, bad_flag: torch.Tensor,
                counts: torch.Tensor | None = None, ids_dtype: torch.dtype = torch.int64):
    """`hidden (T, H)`, router `weight (E, H)` and `bias (E,)` → `(ids (T, k), weights (T, k))`.

    `bad_flag` (one int32 on the device) is raised to 1 when any logit is non-finite; `counts (≥ E,)` int64,
    when given, gains one per routed pair."""
    num_tokens, hidden_size = hidden.shape
    num_experts = weight.shape[0]
    ids = torch.empty(num_tokens, top_k, dtype=ids_dtype, device=hidden.device)
    weights = torch.empty(num_tokens, top_k, dtype=weights_dtype, device=hidden.device)
    fp32_logits = switch or hidden.dtype == torch.float32
    block_t = 16
    block_e = max(16, triton.next_power_of_2(num_experts))
    block_h = 64 if block_e <= 64 else 32
    grid = (triton.cdiv(num_tokens, block_t),)
    _route_kernel[grid](
        hidden, weight, bias if bias is not None else weight, ids, weights,
        counts if counts is not None else bad_flag, bad_flag,
        num_tokens, hidden_size, num_experts, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        TOP_K=top_k, K_PAD=max(triton.next_power_of_2(top_k), 2), HAS_BIAS=bias is not None, SWITCH=switch,
        NORMALIZE=normalize, FP32_LOGITS=fp32_logits, UPCAST=fp32_logits or hidden.dtype == torch.bfloat16,
        COUNT=counts is not None,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=block_h, num_warps=4,
    )
    return ids, weights

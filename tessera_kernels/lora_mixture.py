"""Per-row LoRA mixture: y += sum_k w[b, k] * B[slot[b, k]] @ (A[slot[b, k]] @ x) for every token of row b.

Each batch row carries its own list of adapter slots and weights (a router's decision), so one batch mixes
adapters freely. Punica's SGMV groups tokens by adapter and applies one adapter per token; here a row may mix
K adapters with arbitrary weights, and the whole heterogeneous batch runs in two launches:

* shrink: grid (row tiles, K, split). Each program computes v[t, k, :] = w[b, k] * A[slot] x[t] for a tile of
  one row's tokens, in fp32, over one slice of the input features (split > 1 only when rows x K programs
  would leave the GPU idle, as in decode; slices then meet through fp32 atomic adds). Slot -1 means
  "no adapter" and the program does nothing.
* expand: grid (row tiles, output blocks). Each program sums over the K slots of its row,
  acc += v[t, k, :] @ B[slot]^T, and adds acc to y in place, so no atomics are needed and K adapters cost
  one pass over y.

Tokens of row b are the contiguous block x[b * L:(b + 1) * L] (padded batches, as transformers builds them).
`lora_mixture_reference` is the plain-PyTorch definition (the packed kernel's reference, `tessera_kernels.lora_sgmv`,
with every token taking its row's slots), which is also the fallback when Triton is missing. Packed batches
(rows of any length) and adapter-grouped work are `tessera_kernels.lora_sgmv`.
"""
from __future__ import annotations

import torch

from tessera_kernels import triton_available, triton_importable
from tessera_kernels.lora_sgmv import check_operands, lora_sgmv_reference, row_token_slots

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _shrink_kernel(
        x_ptr, a_ptr, slot_ptr, w_ptr, v_ptr,
        L, IN, R, K,
        stride_xt, stride_as, stride_ar, stride_ai, SPLIT_LEN,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        k = tl.program_id(1)
        start = tl.program_id(2) * SPLIT_LEN
        tiles_per_row = tl.cdiv(L, BLOCK_M)
        row = pid_t // tiles_per_row
        offs_m = (pid_t % tiles_per_row) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < L
        tok = (row * L + offs_m).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        slot = tl.load(slot_ptr + row * K + k).to(tl.int64)
        if slot >= 0:
            weight = tl.load(w_ptr + row * K + k)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for i0 in range(start, start + SPLIT_LEN, BLOCK_K):
                offs_i = i0 + tl.arange(0, BLOCK_K)
                i_mask = offs_i < IN
                xt = tl.load(x_ptr + tok[:, None] * stride_xt + offs_i[None, :],
                             mask=m_mask[:, None] & i_mask[None, :], other=0.0)
                at = tl.load(a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + offs_i[:, None] * stride_ai,
                             mask=r_mask[None, :] & i_mask[:, None], other=0.0)
                if DOT_FP32:
                    xt = xt.to(tl.float32)
                    at = at.to(tl.float32)
                acc += tl.dot(xt, at, input_precision=PRECISION)
            acc = acc * weight
            v_ptrs = v_ptr + tok[:, None] * (K * R) + k * R + offs_r[None, :]
            if SPLIT_K == 1:
                tl.store(v_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])
            else:
                tl.atomic_add(v_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])

    @triton.jit
    def _expand_kernel(
        v_ptr, b_ptr, slot_ptr, y_ptr,
        L, OUT, R, K,
        stride_yt, stride_bs, stride_bo, stride_br,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
        tiles_per_row = tl.cdiv(L, BLOCK_M)
        row = pid_t // tiles_per_row
        offs_m = (pid_t % tiles_per_row) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < L
        tok = (row * L + offs_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < OUT
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K):
            slot = tl.load(slot_ptr + row * K + k).to(tl.int64)
            if slot >= 0:
                vt = tl.load(v_ptr + tok[:, None] * (K * R) + k * R + offs_r[None, :],
                             mask=m_mask[:, None] & r_mask[None, :], other=0.0)
                bt = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bo + offs_r[:, None] * stride_br,
                             mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                vt = vt.to(bt.dtype)
                if DOT_FP32:
                    vt = vt.to(tl.float32)
                    bt = bt.to(tl.float32)
                acc += tl.dot(vt, bt, input_precision=PRECISION)
        y_ptrs = y_ptr + tok[:, None] * stride_yt + offs_n[None, :]
        y_mask = m_mask[:, None] & n_mask[None, :]
        yt = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (yt.to(tl.float32) + acc).to(yt.dtype), mask=y_mask)


def _check(x, y, a_stack, b_stack, slots, weights):
    """Validate shapes and devices; return (x2, rows, tokens per row)."""
    if slots.dim() != 2 or weights.shape != slots.shape:
        raise ValueError(f"slots and weights must both be [rows, K], got {tuple(slots.shape)} and "
                         f"{tuple(weights.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    check_operands(x2, y, a_stack, b_stack, slots, weights)
    rows = slots.shape[0]
    if rows == 0 or x2.shape[0] % rows:
        raise ValueError(f"{x2.shape[0]} tokens cannot be split evenly into {rows} rows")
    return x2, rows, x2.shape[0] // rows


def lora_mixture_reference(x, y, a_stack, b_stack, slots, weights):
    """Plain-PyTorch definition of the mixture (fp32 accumulation, v rounded to the adapter dtype like the
    kernel): the packed reference with every token taking its row's slots. Adds the mixture to y (shape
    [tokens, out]) in place and returns y."""
    x2, rows, per_row = _check(x, y, a_stack, b_stack, slots, weights)
    token_slots, token_weights = row_token_slots(slots, weights, per_row)
    return lora_sgmv_reference(x2, y, a_stack, b_stack, token_slots, token_weights)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _split_k(device, programs: int, chunks: int) -> int:
    """Split the shrink's reduction over `in` when rows x K programs alone would leave SMs idle (decode)."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    split = 1
    while programs * split < target and split * 4 <= chunks:
        split *= 2
    return split


def lora_mixture_triton(x, y, a_stack, b_stack, slots, weights, split_k: int | None = None):
    """Two-launch Triton version of `lora_mixture_reference` (same contract). `split_k` splits the shrink's
    reduction over input features across programs (fp32 atomics); None picks it from the GPU's SM count."""
    x2, rows, per_row = _check(x, y, a_stack, b_stack, slots, weights)
    x2 = x2.contiguous()
    a_stack, b_stack = a_stack.contiguous(), b_stack.contiguous()
    slots = slots.to(torch.int32).contiguous()
    weights = weights.to(torch.float32).contiguous()
    if y.stride(1) != 1:
        raise ValueError("y must have unit stride along its feature dimension")
    n_slots, rank, d_in = a_stack.shape
    d_out = b_stack.shape[1]
    k = slots.shape[1]
    # fp32 runs full-precision FMA dots: 32- and 64-row tiles at rank 64 spill registers on sm_80
    # (tessera_kernels.launch_check).
    block_m = min(16 if x.dtype == torch.float32 else 64, max(16, _next_pow2(per_row)))
    block_r = max(16, _next_pow2(rank))
    block_k = min(64, max(16, _next_pow2(d_in)))
    block_n = min(64, max(16, _next_pow2(d_out)))
    # fp32 dots default to TF32 on GPUs; "ieee" keeps parity with the reference.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    # Triton's CPU interpreter computes bf16 dots wrongly (numpy has no bf16): upcast the tiles there.
    dot_fp32 = x.device.type == "cpu" and x.dtype == torch.bfloat16
    if dot_fp32:
        precision = "ieee"
    tiles = rows * triton.cdiv(per_row, block_m)
    chunks = triton.cdiv(d_in, block_k)
    split = split_k if split_k is not None else _split_k(x.device, tiles * k, chunks)
    if split < 1:
        raise ValueError(f"split_k must be >= 1, got {split}")
    split_len = triton.cdiv(chunks, split) * block_k
    v = (torch.zeros if split > 1 else torch.empty)((x2.shape[0], k, rank), device=x.device, dtype=torch.float32)
    _shrink_kernel[(tiles, k, split)](
        x2, a_stack, slots, weights, v,
        per_row, d_in, rank, k,
        x2.stride(0), a_stack.stride(0), a_stack.stride(1), a_stack.stride(2), split_len,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, PRECISION=precision, DOT_FP32=dot_fp32,
        SPLIT_K=split,
    )
    _expand_kernel[(tiles, triton.cdiv(d_out, block_n))](
        v, b_stack, slots, y,
        per_row, d_out, rank, k,
        y.stride(0), b_stack.stride(0), b_stack.stride(1), b_stack.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, PRECISION=precision, DOT_FP32=dot_fp32,
    )
    return y


def lora_mixture(x, y, a_stack, b_stack, slots, weights, backend: str = "auto"):
    """Add the per-row LoRA mixture to `y` in place.

    x: [rows * L, in] or [rows, L, in]; y: [rows * L, out] (the base layer's output);
    a_stack: [slots, r, in]; b_stack: [slots, out, r]; slots: [rows, K] int (-1 = empty);
    weights: [rows, K] float, already multiplied by each adapter's LoRA scale.
    backend: "triton", "torch" or "auto" (Triton where it can run, else the reference).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and triton_available(x.device))
    if use_triton:
        if not triton_available(x.device):
            raise RuntimeError(f"Triton cannot run on {x.device} here (no CUDA, or TRITON_INTERPRET is not 1)")
        return lora_mixture_triton(x, y, a_stack, b_stack, slots, weights)
    return lora_mixture_reference(x, y, a_stack, b_stack, slots, weights)

"""Packed, segment-grouped LoRA mixture: y[t] += sum_k w[t, k] * B[slot[t, k]] @ (A[slot[t, k]] @ x[t]).

Tokens are packed (continuous batching: rows of any length back to back, or tokens of one expert in an MoE
layer), each with its own K adapter slots and weights. As in Punica's SGMV and vLLM's punica `lora_shrink` /
`lora_expand`, the (token, k) pairs are grouped by adapter slot, so a program works on BLOCK_M pairs of one
adapter and reads that adapter's A and B tiles once for all of them (the row kernel `tessera_kernels.lora_mixture`
reads them once per row). Grouping runs on the device without reading anything back to the host: each slot's
pairs are padded to a multiple of BLOCK_M (as `moe_align` does for experts), and the grid is sized for the
worst case (`pairs / BLOCK_M + slots + 1` tiles; tiles past the end exit at once).

* shrink: grid (tiles,). v[p, :] = w[p] * A[slot] x[token(p)], fp32.
* expand: grid (tiles, output blocks). y[token(p)] += v[p] @ B[slot]^T; with K = 1 every token has one pair, so
  programs own their rows; with K > 1 the pairs of one token meet through fp32 atomic adds into a buffer.

A padded batch (rows of equal length L with per-row slots) is the special case slot[t] = row_slots[t // L].
`lora_sgmv_reference` is the plain-PyTorch definition and the fallback without Triton.
"""
from __future__ import annotations

import torch

from tessera_kernels import triton_available, triton_importable

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _sgmv_shrink_kernel(
        x_ptr, a_ptr, pair_ptr, tile_slot_ptr, w_ptr, v_ptr,
        IN, R, K,
        stride_xt, stride_as, stride_ar, stride_ai,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        tile = tl.program_id(0)
        slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
        if slot >= 0:
            pair = tl.load(pair_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_mask = pair >= 0
            tok = tl.where(m_mask, pair // K, 0)
            weight = tl.load(w_ptr + pair, mask=m_mask, other=0.0)
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for i0 in range(0, IN, BLOCK_K):
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
            acc = acc * weight[:, None]
            tl.store(v_ptr + pair[:, None] * R + offs_r[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])

    @triton.jit
    def _sgmv_expand_kernel(
        v_ptr, b_ptr, pair_ptr, tile_slot_ptr, y_ptr,
        OUT, R, K,
        stride_yt, stride_bs, stride_bo, stride_br,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr, ATOMIC: tl.constexpr,
    ):
        tile = tl.program_id(0)
        slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
        if slot >= 0:
            pair = tl.load(pair_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_mask = pair >= 0
            tok = tl.where(m_mask, pair // K, 0)
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < OUT
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            vt = tl.load(v_ptr + pair[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                         other=0.0)
            bt = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bo + offs_r[:, None] * stride_br,
                         mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            vt = vt.to(bt.dtype)
            if DOT_FP32:
                vt = vt.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(vt, bt, input_precision=PRECISION)
            y_ptrs = y_ptr + tok[:, None] * stride_yt + offs_n[None, :]
            y_mask = m_mask[:, None] & n_mask[None, :]
            if ATOMIC:
                tl.atomic_add(y_ptrs, acc, mask=y_mask)
            else:
                yt = tl.load(y_ptrs, mask=y_mask, other=0.0)
                tl.store(y_ptrs, (yt.to(tl.float32) + acc).to(yt.dtype), mask=y_mask)


def check_operands(x, y, a_stack, b_stack, *routing):
    """Shapes, devices and dtypes shared by both mixture kernels (x: [T, in], y: [T, out])."""
    if a_stack.dim() != 3 or b_stack.dim() != 3:
        raise ValueError(f"adapter stacks must be [slots, r, in] and [slots, out, r], got {tuple(a_stack.shape)} "
                         f"and {tuple(b_stack.shape)}")
    n_slots, rank, d_in = a_stack.shape
    if b_stack.shape[0] != n_slots or b_stack.shape[2] != rank:
        raise ValueError(f"B stack {tuple(b_stack.shape)} does not match A stack {tuple(a_stack.shape)}")
    if x.dim() != 2 or x.shape[1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features but the adapters expect {d_in} (x must be [tokens, in], "
                         f"got {tuple(x.shape)})")
    if y.dim() != 2 or y.shape != (x.shape[0], b_stack.shape[1]):
        raise ValueError(f"y must be [{x.shape[0]}, {b_stack.shape[1]}], got {tuple(y.shape)}")
    devices = {t.device for t in (x, y, a_stack, b_stack, *routing)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if a_stack.dtype != x.dtype or b_stack.dtype != x.dtype:
        raise ValueError(f"adapter dtype {a_stack.dtype}/{b_stack.dtype} differs from activations {x.dtype}")


def _check(x, y, a_stack, b_stack, token_slots, token_weights):
    check_operands(x, y, a_stack, b_stack, token_slots, token_weights)
    if token_slots.dim() != 2 or token_slots.shape[0] != x.shape[0] or token_weights.shape != token_slots.shape:
        raise ValueError(f"token_slots and token_weights must both be [{x.shape[0]}, K], got "
                         f"{tuple(token_slots.shape)} and {tuple(token_weights.shape)}")


def lora_sgmv_reference(x, y, a_stack, b_stack, token_slots, token_weights):
    """Plain-PyTorch definition (fp32 accumulation, v rounded to the adapter dtype like the kernels), grouped
    by slot. x: [T, in]; y: [T, out], updated in place and returned; token_slots/token_weights: [T, K]."""
    _check(x, y, a_stack, b_stack, token_slots, token_weights)
    if token_slots.numel() and int(token_slots.max()) >= a_stack.shape[0]:
        raise ValueError(f"slot {int(token_slots.max())} is out of range for {a_stack.shape[0]} adapter slots")
    for slot in torch.unique(token_slots[token_slots >= 0]).tolist():
        tok, k = (token_slots == slot).nonzero(as_tuple=True)
        v = (x[tok].float() @ a_stack[slot].float().T) * token_weights[tok, k].float()[:, None]
        delta = v.to(b_stack.dtype).float() @ b_stack[slot].float().T
        y.index_add_(0, tok, delta.to(y.dtype))
    return y


def group_pairs(token_slots: torch.Tensor, n_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, k) pairs by slot, pad each slot's run to a multiple of block_m, on the device.

    Returns pair ids `[tiles * block_m]` (token * K + k, -1 = padding) and each tile's slot `[tiles]` (-1 =
    nothing to do), with tiles = pairs // block_m + slots + 1, the most any grouping needs."""
    device = token_slots.device
    flat = token_slots.reshape(-1).to(torch.int64)
    pairs = flat.numel()
    key = torch.where((flat >= 0) & (flat < n_slots), flat, n_slots)  # empty pairs form the last group
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(n_slots + 1, dtype=torch.int64, device=device).index_add_(0, key, torch.ones_like(key))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[n_slots] = 0  # empty pairs get no tiles
    start = torch.cumsum(counts, 0) - counts
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    sorted_key = key[order]
    position = padded_start[sorted_key] + torch.arange(pairs, device=device) - start[sorted_key]
    tiles = pairs // block_m + n_slots + 1
    pair_ids = torch.full((tiles * block_m,), -1, dtype=torch.int32, device=device)
    keep = sorted_key < n_slots
    pair_ids[position[keep]] = order[keep].to(torch.int32)
    tile_start = torch.arange(tiles, device=device) * block_m
    tile_slot = torch.searchsorted(padded_end, tile_start, right=True)
    tile_slot = torch.where(tile_slot < n_slots, tile_slot, -1).to(torch.int32)
    return pair_ids, tile_slot


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


BLOCK_M = 16


def lora_sgmv_triton(x, y, a_stack, b_stack, token_slots, token_weights, grouping=None):
    """Two-launch Triton version of `lora_sgmv_reference` (same contract). `grouping`: what
    `group_pairs(token_slots, slots, BLOCK_M)` returns, when every layer of a pass shares the token slots."""
    _check(x, y, a_stack, b_stack, token_slots, token_weights)
    if y.stride(1) != 1:
        raise ValueError("y must have unit stride along its feature dimension")
    x = x.contiguous()
    a_stack, b_stack = a_stack.contiguous(), b_stack.contiguous()
    n_slots, rank, d_in = a_stack.shape
    d_out = b_stack.shape[1]
    k = token_slots.shape[1]
    if x.shape[0] == 0 or k == 0:
        return y
    block_m = BLOCK_M
    pair_ids, tile_slot = grouping if grouping is not None else group_pairs(token_slots, n_slots, block_m)
    weights = token_weights.to(torch.float32).reshape(-1).contiguous()
    block_r = max(16, _next_pow2(rank))
    block_k = min(64, max(16, _next_pow2(d_in)))
    block_n = min(64, max(16, _next_pow2(d_out)))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    dot_fp32 = x.device.type == "cpu" and x.dtype == torch.bfloat16  # the interpreter's bf16 dot is wrong
    if dot_fp32:
        precision = "ieee"
    tiles = tile_slot.shape[0]
    v = torch.empty((x.shape[0] * k, rank), device=x.device, dtype=torch.float32)
    _sgmv_shrink_kernel[(tiles,)](
        x, a_stack, pair_ids, tile_slot, weights, v,
        d_in, rank, k,
        x.stride(0), a_stack.stride(0), a_stack.stride(1), a_stack.stride(2),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, PRECISION=precision, DOT_FP32=dot_fp32,
    )
    atomic = k > 1
    target = torch.zeros(y.shape, device=y.device, dtype=torch.float32) if atomic else y
    _sgmv_expand_kernel[(tiles, triton.cdiv(d_out, block_n))](
        v, b_stack, pair_ids, tile_slot, target,
        d_out, rank, k,
        target.stride(0), b_stack.stride(0), b_stack.stride(1), b_stack.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, PRECISION=precision, DOT_FP32=dot_fp32,
        ATOMIC=atomic,
    )
    if atomic:
        y.copy_((y.float() + target).to(y.dtype))
    return y


def lora_sgmv(x, y, a_stack, b_stack, token_slots, token_weights, backend: str = "auto", grouping=None):
    """Add the packed per-token LoRA mixture to `y` in place (see the module docstring).

    x: [T, in]; y: [T, out]; a_stack: [slots, r, in]; b_stack: [slots, out, r]; token_slots: [T, K] int
    (-1 = empty); token_weights: [T, K] float, already multiplied by each adapter's LoRA scale.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and triton_available(x.device))
    if use_triton:
        if not triton_available(x.device):
            raise RuntimeError(f"Triton cannot run on {x.device} here (no CUDA, or TRITON_INTERPRET is not 1)")
        return lora_sgmv_triton(x, y, a_stack, b_stack, token_slots, token_weights, grouping)
    return lora_sgmv_reference(x, y, a_stack, b_stack, token_slots, token_weights)


def row_token_slots(slots: torch.Tensor, weights: torch.Tensor, seq_lens: torch.Tensor | int):
    """Per-token slots and weights from per-row ones: rows of `seq_lens` tokens each (an int for a padded
    batch of equal rows, or a [rows] tensor for packed varlen rows)."""
    if torch.is_tensor(seq_lens):
        seq_lens = seq_lens.to(slots.device)
    return slots.repeat_interleave(seq_lens, 0), weights.repeat_interleave(seq_lens, 0)

"""Grouped expert GEMMs over all experts in one launch each, written for a slice of every expert.

Layout (as in Hugging Face and nn.Linear, output-major): the first matrix `w1` is `(E, F_s, H)`, the optional
up matrix `w3` of gated experts is `(E, F_s, H)`, the second matrix `w2` is `(E, H, F_s)`. `F_s` is any slice
width of the hidden FFN dimension: a rank holding columns `[a, b)` of every expert's first matrix and rows
`[a, b)` of its second computes an exact partial output, and the partial outputs of all slices sum to the full
expert output. Nothing here assumes `F_s` is a multiple of a block size.

Gated experts run gate and up as one GEMM over one merged weight: `w3` must be `w1` shifted by a fixed offset
inside one tensor (`[w1; w3]` concatenated, Mixtral/Qwen's `gate_up_proj`, any column slice of it, or gate and
up rows interleaved); `merged_gate_up` makes such a tensor when they are apart. Each weight tile holds
`BLOCK_N / 2` gate rows interleaved with the matching up rows, so one `tl.dot` into one accumulator computes
both, and the epilogue splits it into `act(gate) * up`.

`expert_up` computes `act(x @ w1[e].T [+ b1[e]]) [* (x @ w3[e].T)]` for every pair, rows read from token
`pair // top_k`, and writes row `pair` of the intermediate. `expert_down` computes
`(inter @ w2[e].T [+ b2[e]]) * weight[pair]` into row `pair` of the output. The first bias is sliced with the
columns; the second belongs to whole experts, so exactly one slice adds it. Row blocks come from
`tessera_kernels.moe_align`; blocks past the device-side padded length exit at once.

Both launch a 1-D grid in grouped order (`GROUP_SIZE_M` row blocks walk the output columns together), so the
activation rows of a group stay in L2 while the weight tiles stream. Row counts that change every call
(`num_pairs`) are not specialised on, so a new batch size never recompiles.
"""
from __future__ import annotations

import torch

from tessera_kernels import triton_importable
from tessera_kernels.moe_align import AlignedPairs

ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _activation(x, ACTIVATION: tl.constexpr):
        if ACTIVATION == 0:
            return tl.maximum(x, 0.0)
        if ACTIVATION == 1:
            return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        if ACTIVATION == 2:
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
        return x * tl.sigmoid(x)

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # Triton's CPU interpreter multiplies 16-bit float tiles wrongly; it gets fp32 tiles instead.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _grouped_block(num_cols, GROUP_SIZE_M: tl.constexpr):
        """(row block, column block) of this program: consecutive programs share row blocks (L2 reuse)."""
        pid = tl.program_id(0)
        num_rows = tl.num_programs(0) // num_cols
        per_group = GROUP_SIZE_M * num_cols
        first_row = (pid // per_group) * GROUP_SIZE_M
        group_rows = tl.minimum(num_rows - first_row, GROUP_SIZE_M)
        return first_row + (pid % per_group) % group_rows, (pid % per_group) // group_rows

    @triton.jit(do_not_specialize=["num_pairs"])
    def _expert_up_kernel(
        x_ptr, w_ptr, b1_ptr, out_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
        num_pairs, top_k, N, K, up_offset,
        stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
        OUT_N: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # OUT_N output columns per program: BLOCK_N, or BLOCK_N / 2 when the tile holds gate and up columns
        pid_m, pid_n = _grouped_block(tl.cdiv(N, OUT_N), GROUP_SIZE_M)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
        pairs = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < num_pairs
        tokens = (pairs // top_k).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        if GATED:  # tile column 2j is gate row j, column 2j + 1 the matching up row
            offs_n = pid_n * OUT_N + cols // 2
            w_rows = offs_n * stride_wn + (cols % 2) * up_offset
        else:
            offs_n = pid_n * OUT_N + cols
            w_rows = offs_n * stride_wn
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + expert * stride_we + w_rows[None, :] + offs_k[:, None] * stride_wk
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k_start
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _dot(x, w, acc, PRECISION, UPCAST)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        if GATED:
            gate, up = tl.split(tl.reshape(acc, (BLOCK_M, OUT_N, 2)))
        else:
            gate = acc
        offs_out = pid_n * OUT_N + tl.arange(0, OUT_N)
        out_ok = offs_out < N
        if HAS_BIAS:
            gate += tl.load(b1_ptr + expert * stride_be + offs_out, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        result = _activation(gate, ACTIVATION)
        if GATED:
            result = result * up
        out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + offs_out[None, :] * stride_on
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])

    @triton.jit(do_not_specialize=["num_pairs"])
    def _expert_down_kernel(
        a_ptr, w2_ptr, b2_ptr, out_ptr, pair_weights_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
        num_pairs, N, K,
        stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_be, stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
        HAS_BIAS: tl.constexpr, WEIGHTED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m, pid_n = _grouped_block(tl.cdiv(N, BLOCK_N), GROUP_SIZE_M)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
        pairs = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < num_pairs
        rows = pairs.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w2_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k_start
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
            acc = _dot(a, w, acc, PRECISION, UPCAST)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            acc += tl.load(b2_ptr + expert * stride_be + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if WEIGHTED:
            acc = acc * tl.load(pair_weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def shares_gate_up_storage(w1: torch.Tensor, w3: torch.Tensor) -> bool:
    """Whether `w3` is `w1` moved by a fixed offset inside one tensor (so one pointer and an offset reach both)."""
    return _root(w1) is _root(w3) and w1.stride() == w3.stride() and w1.shape == w3.shape


def merged_gate_up(w1: torch.Tensor, w3: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`(w1 view, offset in elements from a gate row to its up row)`; copies `[w1; w3]` into one tensor only
    when they are stored apart (`ExpertWeights` stores them merged, so the engine never copies here)."""
    if not shares_gate_up_storage(w1, w3):
        merged = torch.cat([w1, w3], dim=1)
        w1, w3 = merged[:, : w1.shape[1]], merged[:, w1.shape[1]:]
    return w1, w3.storage_offset() - w1.storage_offset()


def _precision(dtype: torch.dtype) -> str:
    # fp32 dots default to TF32 on NVIDIA GPUs; exact parity in fp32 needs full-precision products.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype != torch.float32


def _bias_stride(bias: torch.Tensor | None) -> int:
    if bias is None:
        return 0
    if bias.stride(1) != 1:
        raise ValueError("expert biases must be contiguous along their last dimension")
    return bias.stride(0)


def _launch_options(config: dict) -> dict:
    return {k: config[k] for k in ("num_warps", "num_stages")}


def expert_up(
    x: torch.Tensor, aligned: AlignedPairs, top_k: int, w1: torch.Tensor, w3: torch.Tensor | None,
    activation: str, config: dict, b1: torch.Tensor | None = None,
) -> torch.Tensor:
    """First projection for every pair, activation (and gate) fused: returns `(num_pairs, F_s)`."""
    num_experts, n, k = w1.shape
    up_offset = 0
    if w3 is not None:
        w1, up_offset = merged_gate_up(w1, w3)
    out = torch.empty(aligned.num_pairs, n, dtype=x.dtype, device=x.device)
    out_n = config["BLOCK_N"] // 2 if w3 is not None else config["BLOCK_N"]
    grid = (aligned.max_blocks * triton.cdiv(n, out_n),)
    _expert_up_kernel[grid](
        x, w1, b1 if b1 is not None else w1, out,
        aligned.sorted_pair_ids, aligned.block_expert_ids, aligned.num_padded,
        aligned.num_pairs, top_k, n, k, up_offset,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), _bias_stride(b1),
        out.stride(0), out.stride(1),
        BLOCK_M=aligned.block_m, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        GROUP_SIZE_M=config["GROUP_SIZE_M"], OUT_N=out_n, GATED=w3 is not None, HAS_BIAS=b1 is not None,
        ACTIVATION=ACTIVATIONS[activation], PRECISION=_precision(x.dtype), UPCAST=_upcast(x),
        **_launch_options(config),
    )
    return out


def expert_down(
    inter: torch.Tensor, aligned: AlignedPairs, w2: torch.Tensor, pair_weights: torch.Tensor | None,
    config: dict, out_dtype: torch.dtype | None = None, b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Second projection for every pair, routing weight fused: returns `(num_pairs, H)`."""
    num_experts, n, k = w2.shape
    out = torch.empty(aligned.num_pairs, n, dtype=out_dtype or inter.dtype, device=inter.device)
    grid = (aligned.max_blocks * triton.cdiv(n, config["BLOCK_N"]),)
    _expert_down_kernel[grid](
        inter, w2, b2 if b2 is not None else w2, out, pair_weights if pair_weights is not None else inter,
        aligned.sorted_pair_ids, aligned.block_expert_ids, aligned.num_padded,
        aligned.num_pairs, n, k,
        inter.stride(0), inter.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), _bias_stride(b2),
        out.stride(0), out.stride(1),
        BLOCK_M=aligned.block_m, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        GROUP_SIZE_M=config["GROUP_SIZE_M"], HAS_BIAS=b2 is not None, WEIGHTED=pair_weights is not None,
        PRECISION=_precision(inter.dtype), UPCAST=_upcast(inter),
        **_launch_options(config),
    )
    return out
def apply_activation_reference(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(x)
    if activation == "gelu":
        return torch.nn.functional.gelu(x)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(x)
    raise ValueError(f"unsupported expert activation {activation!r}; supported: {sorted(ACTIVATIONS)}")


def _pairs_by_expert(expert_ids: torch.Tensor, num_experts: int):
    """(expert, its pairs' flat indices) for every expert with pairs; ids outside `[0, E)` belong to none.
    One sort and one read of the counts (a synchronisation on CUDA, free on CPU)."""
    flat = expert_ids.reshape(-1)
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.argsort(key, stable=True)
    start = 0
    for expert, count in enumerate(torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()):
        if count:
            yield expert, order[start : start + count]
            start += count


def expert_up_reference(x, expert_ids, top_k, w1, w3, activation, b1=None, out_dtype=None):
    """Per-pair reference of `expert_up`, in fp32: rows of pairs outside `[0, E)` are zero."""
    out = torch.zeros(expert_ids.numel(), w1.shape[1], dtype=torch.float32, device=x.device)
    for expert, pairs in _pairs_by_expert(expert_ids, w1.shape[0]):
        rows = x[pairs // top_k].float()
        pre = rows @ w1[expert].float().T
        if b1 is not None:
            pre = pre + b1[expert].float()
        h = apply_activation_reference(pre, activation)
        if w3 is not None:
            h = h * (rows @ w3[expert].float().T)
        out[pairs] = h
    return out.to(out_dtype or x.dtype)


def expert_down_reference(inter, expert_ids, w2, pair_weights, b2=None, out_dtype=None):
    """Per-pair reference of `expert_down`, in fp32: rows of pairs outside `[0, E)` are zero."""
    out = torch.zeros(expert_ids.numel(), w2.shape[1], dtype=torch.float32, device=inter.device)
    for expert, pairs in _pairs_by_expert(expert_ids, w2.shape[0]):
        y = inter[pairs].float() @ w2[expert].float().T
        if b2 is not None:
            y = y + b2[expert].float()
        if pair_weights is not None:
            y = y * pair_weights.reshape(-1)[pairs].float()[:, None]
        out[pairs] = y
    return out.to(out_dtype or inter.dtype)

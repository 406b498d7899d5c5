"""Block sizes for the MoE kernels, keyed by device and by how many rows each expert gets.

Kept apart from the kernels so that tuning is an edit to this table, not to kernel code. Rows per expert is
`num_pairs / num_experts`, known on the host from shapes alone (no device read). Few rows per expert means the
GEMMs are bound by reading weights: small row blocks waste less padding and wide K tiles stream the weights.
Many rows means compute-bound: large square tiles.
"""
from __future__ import annotations

import torch

# (max rows per expert, config) in increasing order; the first bucket that fits is used.
_CUDA_TABLE = [
    (16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)),
    (64, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)),
    (256, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)),
    (float("inf"), dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)),
]

# Hopper has more shared memory per SM: deeper pipelines and wider tiles for the compute-bound buckets.
_SM90_TABLE = [
    (16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=5)),
    (64, dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)),
    (512, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)),
    (float("inf"), dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)),
]

# 4-byte elements double the shared memory per tile: narrower K tiles keep the pipelined buffers of the gated
# GEMM (x, w1 and w3 tiles per stage) inside Hopper's 227 KiB (checked by tests/moe/moe_aot.py).
_FP32_TABLE = [
    (16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)),
    (64, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)),
    (512, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=3)),
    (float("inf"), dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)),
]

# Triton's interpreter runs each program in numpy: larger tiles mean fewer programs; padding cost is small.
_INTERPRETER_TABLE = [(float("inf"), dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1))]


def _table_for(device: torch.device, dtype: torch.dtype):
    if device.type != "cuda":
        return _INTERPRETER_TABLE
    if dtype.itemsize >= 4:
        return _FP32_TABLE
    major, _ = torch.cuda.get_device_capability(device)
    return _SM90_TABLE if major >= 9 else _CUDA_TABLE


def moe_kernel_config(num_pairs: int, num_experts: int, device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Block sizes and launch options for both expert GEMMs of one MoE layer call."""
    rows_per_expert = num_pairs / max(num_experts, 1)
    for bound, config in _table_for(torch.device(device), dtype):
        if rows_per_expert <= bound:
            return dict(config)
    raise AssertionError("the last bucket is unbounded")

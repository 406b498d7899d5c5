"""Group token–expert pairs by expert, padded to the GEMM row-block size, without a host synchronisation.

The grouped GEMMs process `BLOCK_M` rows at a time and every block must belong to a single expert, so each
expert's pairs are laid out contiguously and padded up to a multiple of `BLOCK_M`. All outputs are sized by an
upper bound known on the host, and the real padded length stays on the device: the GEMM launches use the bound
for their grid and skip blocks past the device-side length, so nothing waits for the GPU.

Pair `p` is token `p // top_k`'s `p % top_k`-th choice. Padding slots hold the sentinel `num_pairs`. Pairs whose
expert id is outside `[0, num_experts)` (dropped by a capacity limit, or owned by another rank) are left out.
Within an expert, pairs keep their original order, so the layout is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import triton_importable

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _count_pairs_kernel(expert_ids_ptr, counts_ptr, num_pairs, CHUNK: tl.constexpr):
        expert = tl.program_id(0)
        count = tl.zeros((), dtype=tl.int32)
        for start in range(0, num_pairs, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            ids = tl.load(expert_ids_ptr + offs, mask=offs < num_pairs, other=-1)
            count += tl.sum((ids == expert).to(tl.int32), axis=0)
        tl.store(counts_ptr + expert, count)

    @triton.jit
    def _scatter_pairs_kernel(
        expert_ids_ptr, padded_start_ptr, padded_count_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr,
        num_pairs, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
    ):
        expert = tl.program_id(0)
        start = tl.load(padded_start_ptr + expert)
        placed = tl.zeros((), dtype=tl.int32)
        for chunk_start in range(0, num_pairs, CHUNK):
            offs = chunk_start + tl.arange(0, CHUNK)
            ids = tl.load(expert_ids_ptr + offs, mask=offs < num_pairs, other=-1)
            is_mine = (ids == expert).to(tl.int32)
            slot = start + placed + tl.cumsum(is_mine, axis=0) - 1
            tl.store(sorted_pair_ids_ptr + slot, offs, mask=is_mine == 1)
            placed += tl.sum(is_mine, axis=0)
        num_blocks = tl.load(padded_count_ptr + expert) // BLOCK_M
        first_block = start // BLOCK_M
        for block_start in range(0, num_blocks, CHUNK):
            blocks = block_start + tl.arange(0, CHUNK)
            tl.store(block_expert_ids_ptr + first_block + blocks, expert + 0 * blocks, mask=blocks < num_blocks)


@dataclass
class AlignedPairs:
    """Pairs grouped by expert: `sorted_pair_ids[i]` is the pair in padded row `i` (or `num_pairs` for padding),
    `block_expert_ids[b]` the expert of row block `b` (-1 past the end), `num_padded` a 1-element device tensor."""

    sorted_pair_ids: torch.Tensor
    block_expert_ids: torch.Tensor
    num_padded: torch.Tensor
    counts: torch.Tensor
    block_m: int
    num_pairs: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert_ids.numel()


def padded_bounds(num_pairs: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """Host-side upper bounds on (padded rows, row blocks): each expert pads at most one partial block."""
    max_blocks = min(-(-num_pairs // block_m) + num_experts, num_pairs)
    return max_blocks * block_m, max_blocks


def _finish(counts: torch.Tensor, block_m: int):
    padded_count = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded_count, 0)
    return padded_count, padded_end - padded_count, padded_end[-1:]


def moe_align(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """Triton version: two launches (count, then place), one program per expert, no atomics."""
    flat = expert_ids.reshape(-1).to(torch.int32)
    num_pairs = flat.numel()
    max_rows, max_blocks = padded_bounds(num_pairs, num_experts, block_m)
    counts = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
    chunk = 1024
    _count_pairs_kernel[(num_experts,)](flat, counts, num_pairs, CHUNK=chunk)
    padded_count, padded_start, num_padded = _finish(counts, block_m)
    sorted_pair_ids = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=flat.device)
    block_expert_ids = torch.full((max_blocks,), -1, dtype=torch.int32, device=flat.device)
    _scatter_pairs_kernel[(num_experts,)](
        flat, padded_start, padded_count, sorted_pair_ids, block_expert_ids, num_pairs, BLOCK_M=block_m, CHUNK=chunk
    )
    return AlignedPairs(sorted_pair_ids, block_expert_ids, num_padded, counts, block_m, num_pairs)


def moe_align_reference(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """Plain PyTorch: a stable sort by expert, then each expert's run copied to its padded offset."""
    flat = expert_ids.reshape(-1).long()
    num_pairs = flat.numel()
    max_rows, max_blocks = padded_bounds(num_pairs, num_experts, block_m)
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts).to(torch.int32)
    padded_count, padded_start, num_padded = _finish(counts, block_m)
    sorted_pair_ids = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=flat.device)
    block_expert_ids = torch.full((max_blocks,), -1, dtype=torch.int32, device=flat.device)
    order = torch.argsort(torch.where(valid, flat, num_experts), stable=True)
    taken = 0
    for expert in range(num_experts):
        count, start = int(counts[expert]), int(padded_start[expert])
        sorted_pair_ids[start : start + count] = order[taken : taken + count].to(torch.int32)
        first, blocks = start // block_m, int(padded_count[expert]) // block_m
        block_expert_ids[first : first + blocks] = expert
        taken += count
    return AlignedPairs(sorted_pair_ids, block_expert_ids, num_padded, counts, block_m, num_pairs)

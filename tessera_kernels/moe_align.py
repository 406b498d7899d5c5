"""Group token–expert pairs by expert, padded to the GEMM row-block size, in one or two launches and with no
host synchronisation and no torch ops around them.

The grouped GEMMs process `BLOCK_M` rows at a time and every block must belong to a single expert, so each
expert's pairs are laid out contiguously and padded up to a multiple of `BLOCK_M`. All outputs are sized by an
upper bound known on the host from shapes alone, and the real padded length stays on the device: the GEMM
launches use the bound for their grid and skip blocks past the device-side length, so nothing waits for the GPU
and a CUDA graph can capture the whole layer.

One program per expert places that expert's pairs. It needs every expert's count (for its start offset): with
few pairs (decode) each program counts them all itself, so align is one launch; with many, a first launch
counts, one program per expert, and the second reads the counts.

Pair `p` is token `p // top_k`'s `p % top_k`-th choice. Padding slots hold the sentinel `num_pairs`. Pairs whose
expert id is outside `[0, num_experts)` (dropped by a capacity limit, or owned by another rank) are left out.
Within an expert, pairs keep their original order, so the layout is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera_kernels import triton_importable

# Above this many (pair, expert) comparisons per program, counting is a launch of its own.
_COUNT_IN_PLACE_LIMIT = 1 << 17
_CHUNK = 1024

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["num_pairs"])
    def _count_pairs_kernel(expert_ids_ptr, counts_ptr, num_pairs, CHUNK: tl.constexpr):
        expert = tl.program_id(0)
        count = tl.zeros((), dtype=tl.int32)
        for start in range(0, num_pairs, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            ids = tl.load(expert_ids_ptr + offs, mask=offs < num_pairs, other=-1)
            count += tl.sum((ids == expert).to(tl.int32), axis=0)
        tl.store(counts_ptr + expert, count)

    @triton.jit
    def _all_counts(expert_ids_ptr, num_pairs, num_experts, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
        experts = tl.arange(0, E_PAD)
        counts = tl.zeros((E_PAD,), dtype=tl.int32)
        for start in range(0, num_pairs, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            ids = tl.load(expert_ids_ptr + offs, mask=offs < num_pairs, other=-1)
            hit = (ids[:, None] == experts[None, :]) & (experts[None, :] < num_experts)
            counts += tl.sum(hit.to(tl.int32), axis=0)
        return counts

    @triton.jit(do_not_specialize=["num_pairs", "num_experts", "max_rows", "max_blocks", "block_m"])
    def _place_pairs_kernel(
        expert_ids_ptr, counts_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
        num_pairs, num_experts, max_rows, max_blocks, block_m,
        E_PAD: tl.constexpr, COUNT_HERE: tl.constexpr, COUNT_CHUNK: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        expert = tl.program_id(0)
        experts = tl.arange(0, E_PAD)
        if COUNT_HERE:
            counts = _all_counts(expert_ids_ptr, num_pairs, num_experts, E_PAD, COUNT_CHUNK)
            tl.store(counts_ptr + expert, tl.sum(tl.where(experts == expert, counts, 0), axis=0))
        else:
            counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
        padded = (counts + block_m - 1) // block_m * block_m
        start = tl.sum(tl.where(experts < expert, padded, 0), axis=0)
        count = tl.sum(tl.where(experts == expert, counts, 0), axis=0)
        end = start + tl.sum(tl.where(experts == expert, padded, 0), axis=0)
        # This expert's pairs, in order.
        placed = tl.zeros((), dtype=tl.int32)
        for chunk_start in range(0, num_pairs, CHUNK):
            offs = chunk_start + tl.arange(0, CHUNK)
            ids = tl.load(expert_ids_ptr + offs, mask=offs < num_pairs, other=-1)
            is_mine = (ids == expert).to(tl.int32)
            slot = start + placed + tl.cumsum(is_mine, axis=0) - 1
            tl.store(sorted_pair_ids_ptr + slot, offs, mask=is_mine == 1)
            placed += tl.sum(is_mine, axis=0)
        # Its padding rows and its row blocks; the last expert also fills the tail past the padded total.
        total = tl.sum(padded, axis=0)
        if expert == num_experts - 1:
            tl.store(num_padded_ptr, total)
            fill_end = max_rows
            block_end = max_blocks
        else:
            fill_end = end
            block_end = end // block_m
        for row_start in range(start + count, fill_end, CHUNK):
            rows = row_start + tl.arange(0, CHUNK)
            tl.store(sorted_pair_ids_ptr + rows, num_pairs + 0 * rows, mask=rows < fill_end)
        for block_start in range(start // block_m, block_end, CHUNK):
            blocks = block_start + tl.arange(0, CHUNK)
            owner = tl.where(blocks < end // block_m, expert, -1)
            tl.store(block_expert_ids_ptr + blocks, owner, mask=blocks < block_end)


@dataclass
class AlignedPairs:
    """Pairs grouped by expert: `sorted_pair_ids[i]` is the pair in padded row `i` (or `num_pairs` for padding),
    `block_expert_ids[b]` the expert of row block `b` (-1 past the end), `num_padded` a 1-element device tensor,
    `counts[e]` the pairs of expert `e`."""

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
    max_blocks = max(min(-(-num_pairs // block_m) + num_experts, num_pairs), 1)
    return max_blocks * block_m, max_blocks


def align_launches(num_pairs: int, num_experts: int) -> int:
    """How many kernel launches `moe_align` makes for this many pairs (1 at decode sizes, else 2)."""
    return 1 if num_pairs * triton.next_power_of_2(num_experts) <= _COUNT_IN_PLACE_LIMIT else 2


def moe_align(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """Triton version: one program per expert, no atomics; outputs allocated from shapes alone."""
    flat = expert_ids.reshape(-1)
    num_pairs = flat.numel()
    max_rows, max_blocks = padded_bounds(num_pairs, num_experts, block_m)
    device = flat.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_pair_ids = torch.empty(max_rows, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    e_pad = triton.next_power_of_2(num_experts)
    count_here = align_launches(num_pairs, num_experts) == 1
    if not count_here:
        _count_pairs_kernel[(num_experts,)](flat, counts, num_pairs, CHUNK=_CHUNK)
    _place_pairs_kernel[(num_experts,)](
        flat, counts, sorted_pair_ids, block_expert_ids, num_padded, num_pairs, num_experts, max_rows, max_blocks,
        block_m, E_PAD=e_pad, COUNT_HERE=count_here, COUNT_CHUNK=max(16, 2048 // e_pad), CHUNK=_CHUNK,
    )
    return AlignedPairs(sorted_pair_ids, block_expert_ids, num_padded, counts, block_m, num_pairs)


def moe_align_reference(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """Plain PyTorch: a stable sort by expert, then each expert's run copied to its padded offset."""
    flat = expert_ids.reshape(-1).long()
    num_pairs = flat.numel()
    max_rows, max_blocks = padded_bounds(num_pairs, num_experts, block_m)
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts).to(torch.int32)
    padded_count = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded_count, 0) - padded_count
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
    num_padded = padded_count.sum().reshape(1)
    return AlignedPairs(sorted_pair_ids, block_expert_ids, num_padded, counts, block_m, num_pairs)

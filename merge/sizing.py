"""Honest storage accounting for a merged artifact.

A block's groups each store one copy of the block in the output dtype. A merged group of a method with
modulators stores its unified vector plus one bit per entry per member for masks and one float32 per
tensor per member for scales, and then the block's pretrained weights must be stored once as well (they
are what the modulated vector is added to). A singleton group stores its fine-tuned weights as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from merge.greedy import Step


@dataclass(frozen=True)
class BlockCost:
    param_bytes: int
    mask_bytes_per_task: int
    scale_bytes_per_task: int


def block_cost(tensors: list[tuple[int, float]], masks: bool, scales: bool) -> BlockCost:
    """`tensors` are (numel, bytes per element in the output dtype) of the block's tensors."""
    return BlockCost(
        int(sum(n * e for n, e in tensors)),
        sum(math.ceil(n / 8) for n, _ in tensors) if masks else 0,
        4 * len(tensors) if scales else 0,
    )


def group_bytes(cost: BlockCost, members: int, modulated: bool) -> int:
    if members == 1 or not modulated:
        return cost.param_bytes
    return cost.param_bytes + members * (cost.mask_bytes_per_task + cost.scale_bytes_per_task)


def block_bytes(cost: BlockCost, group_sizes: list[int], modulated: bool) -> int:
    total = sum(group_bytes(cost, g, modulated) for g in group_sizes)
    if modulated and any(g > 1 for g in group_sizes):
        total += cost.param_bytes
    return total


def curve(costs: list[BlockCost], steps: list[Step], n_tasks: int, modulated: bool) -> list[int]:
    """Artifact bytes after 0, 1, ..., len(steps) steps."""
    sizes = [[1] * n_tasks for _ in costs]
    current = [block_bytes(c, s, modulated) for c, s in zip(costs, sizes)]
    total = sum(current)
    out = [total]
    for step in steps:
        s = sizes[step.block]
        s.remove(len(step.a))
        s.remove(len(step.b))
        s.append(len(step.a) + len(step.b))
        new = block_bytes(costs[step.block], s, modulated)
        total += new - current[step.block]
        current[step.block] = new
        out.append(total)
    return out


def byte_ordered(steps: list[Step], costs: list[BlockCost], n_tasks: int, modulated: bool) -> list[Step]:
    """The greedy order, changed so that no taken state stores more bytes than the state it replaces.

    With modulators, a block's first merge adds bytes (a unified vector, the base and masks replace two
    fine-tuned copies). Such a step is taken together with the same block's next steps, in the block's own
    order, until the block is smaller than before; steps that never get it there are left out. Every
    block keeps its own merge sequence (a prefix of it), so group trees built block by block still apply."""
    if not modulated:
        return list(steps)
    queues: dict[int, list[Step]] = {}
    for s in steps:
        queues.setdefault(s.block, []).append(s)
    sizes = [[1] * n_tasks for _ in costs]
    out: list[Step] = []
    for step in steps:
        q = queues[step.block]
        if not q or q[0] != step:
            continue  # already taken with an earlier step of its block, or left out
        b = step.block
        before = block_bytes(costs[b], sizes[b], modulated)
        trial, macro = list(sizes[b]), []
        while q:
            s = q.pop(0)
            macro.append(s)
            trial.remove(len(s.a))
            trial.remove(len(s.b))
            trial.append(len(s.a) + len(s.b))
            if block_bytes(costs[b], trial, modulated) < before:
                break
        if block_bytes(costs[b], trial, modulated) < before:
            sizes[b] = trial
            out.extend(macro)
    return out


UNITS = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "b": 1}


def parse_bytes(text) -> float:
    """`800MB`, `1.5GiB`, `123456B` or a plain number of bytes."""
    s = str(text).strip().lower()
    for unit, factor in UNITS.items():
        if s.endswith(unit):
            s, scale = s[: -len(unit)], factor
            break
    else:
        scale = 1
    try:
        return float(s) * scale
    except ValueError:
        raise ValueError(f"not a byte size: {text!r}") from None


def parse_size(text) -> tuple[str, float]:
    """`all`, `min` (one group per block), a multiplier (`2.25`, `2.25x`) or a byte budget (`800MB`)."""
    if isinstance(text, (int, float)):
        return "multiplier", float(text)
    s = str(text).strip().lower()
    if s in ("all", "min"):
        return s, 0.0
    if s.endswith("b"):
        return "bytes", parse_bytes(s)
    try:
        return "multiplier", float(s.rstrip("x×"))
    except ValueError:
        raise ValueError(f"size must be 'all', 'min', a multiplier like 2.25 or a byte budget like 800MB, got {text!r}") from None


def choose_state(sizes: list[int], budget: float) -> int:
    """The fewest merges whose artifact fits the budget (fewer merges keep more accuracy)."""
    for state, size in enumerate(sizes):
        if size <= budget:
            return state
    raise ValueError(f"no merge state fits {budget:.0f} bytes; the smallest reachable is {min(sizes)} bytes")

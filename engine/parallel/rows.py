"""Pack several per-token tensors into one byte row per token, so one collective moves them all.

A collective has a fixed cost (launch, rendezvous, on NCCL about 10-20 µs; more on gloo); at small batches that
cost dominates, so MoEShard sends hidden states, expert ids and routing weights in a single all-gather and EP
sends hidden states and expert ids in a single all-to-all. Every segment starts at a multiple of 8 bytes, so the
unpacked tensors are zero-copy strided views of the received buffer.
"""
from __future__ import annotations

import torch

_ALIGN = 8


def pack_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """2-D tensors with the same number of rows → `(rows, bytes)` uint8, each segment padded to 8 bytes."""
    rows = tensors[0].shape[0]
    parts = []
    for t in tensors:
        b = t.contiguous().view(torch.uint8).view(rows, t.shape[1] * t.element_size())
        pad = -b.shape[1] % _ALIGN
        parts.append(b if pad == 0 else torch.nn.functional.pad(b, (0, pad)))
    return torch.cat(parts, dim=1)


def unpack_rows(buffer: torch.Tensor, specs: list[tuple[int, torch.dtype]]) -> list[torch.Tensor]:
    """Inverse of `pack_rows`: `specs` gives each segment's (columns, dtype) in order; returns views."""
    out, offset = [], 0
    for cols, dtype in specs:
        width = cols * torch.empty((), dtype=dtype).element_size()
        out.append(buffer[:, offset : offset + width].view(dtype))
        offset += width + (-width % _ALIGN)
    return out

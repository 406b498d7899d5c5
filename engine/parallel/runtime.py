"""The distributed runtime: process-group start-up from torchrun's environment, and the few collectives the
strategies use, each behind one function so NCCL (CUDA) and gloo (CPU) run the same code path.

Every collective here works on tensors already on the rank's device and never reads a value back to the host:
the strategies decide all sizes before a layer runs, so a forward pass costs at most the one host
synchronisation that agrees on token counts (`engine.parallel.pass_sync`).

On CPU ranks of one host (gloo), the equal-sized collectives go through shared memory
(`engine.parallel.host_channel`) rather than gloo's loopback TCP: between two ranks on the decode benchmark's
machine a small all-gather took 108 µs that way against 833 µs through gloo (scripts/bench_collectives.py).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.parallel.host_channel import HostChannel, host_channel

DEFAULT_TIMEOUT_S = float(os.environ.get("TESSERA_DIST_TIMEOUT", "600"))
# torch 2.13 renamed these two (the old names warn on every call); 2.11 has only the old ones
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def init_distributed(timeout_s: float | None = None) -> "Dist":
    """Join (or start) the default process group from torchrun's environment and return this rank's view.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT on every node; we pick NCCL when
    CUDA is available (and bind this process to GPU LOCAL_RANK) and gloo otherwise. The timeout bounds every
    collective: a rank that dies makes the others raise instead of waiting forever.
    """
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"init_distributed needs torchrun's environment; missing {missing}. Launch with "
                               "`torchrun --nproc-per-node=G script.py` (add --nnodes/--rdzv-endpoint for several nodes)")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
        dist.init_process_group(backend, timeout=timeout)
        _timeouts[None] = timeout
        _channels.clear()  # a channel of an earlier process group is not this one's
    return Dist.current()


def exit_rank(code: int):
    """End this rank's process with `code` once its work is done and its peers have been told to stop.

    The process groups are destroyed first, which joins the threads gloo and NCCL keep, and the process then
    leaves through os._exit. A plain interpreter exit runs C++ static destructors that can still find one of
    those threads joinable and abort the rank with "terminate called without an active exception" (SIGABRT):
    torchrun then reports a server that drained cleanly as failed."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_timeouts: dict = {}  # group (None: the default one) -> its collectives' timeout
_channels: dict = {}  # group -> its HostChannel, or None where it has none


@dataclass(frozen=True)
class Dist:
    """One rank's view of a process group: who it is, how many there are, where its tensors live.

    With one rank the collectives return their input: a single GPU runs the sharded code path without copies,
    so its overhead against the single-process layer is the path's own (padding, packing), not a memcpy."""

    group: object
    rank: int
    size: int
    backend: str
    device: torch.device
    channel: HostChannel | None = None  # gloo ranks of one host: their shared memory

    @staticmethod
    def current(group=None) -> "Dist":
        """This rank's view of `group`. The first call for a gloo group sets up its host channel, so every rank
        of the group makes that call at the same point (as they all load the model together)."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call engine.parallel.init_distributed() first")
        backend = dist.get_backend(group)
        if backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        if backend == "gloo" and group not in _channels:
            _channels[group] = host_channel(group, _timeouts.get(group, timedelta(seconds=DEFAULT_TIMEOUT_S)))
        return Dist(group, dist.get_rank(group), dist.get_world_size(group), backend, device,
                    _channels.get(group))

    def _shared(self, x: torch.Tensor) -> HostChannel | None:
        """The host channel, where it can carry `x`."""
        channel = self.channel
        return channel if channel is not None and channel.fits(x.numel() * x.element_size()) else None

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """`x (n, ...)` from every rank, equal n on all → `(size * n, ...)` in rank order."""
        if self.size == 1:
            return x
        if (channel := self._shared(x)) is not None:
            return channel.all_gather(x)
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_into(out, x.contiguous(), group=self.group)
        return out

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """`x (size * n, ...)` on every rank → rank r gets the sum over ranks of rows `[r n, (r+1) n)`.

        NCCL has a native reduce-scatter. gloo's is missing from some torch releases, so there we exchange the
        chunks with an all-to-all (the same bytes on the wire) and add them up locally.
        """
        n = x.shape[0] // self.size
        if self.size == 1:
            return x
        if (channel := self._shared(x)) is not None:
            return channel.reduce_scatter(x)
        if self.backend == "nccl":
            out = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
            _reduce_scatter_into(out, x.contiguous(), group=self.group)
            return out
        chunks = torch.empty_like(x)
        dist.all_to_all_single(chunks, x.contiguous(), group=self.group)
        return chunks.view(self.size, n, *x.shape[1:]).sum(0)

    def all_to_all(self, x: torch.Tensor, send_counts: list[int] | None = None,
                   recv_counts: list[int] | None = None) -> torch.Tensor:
        """Rows of `x` split by destination rank (equal splits, or the given counts) → rows received, by source."""
        if self.size == 1:
            return x
        if send_counts is None:
            if (channel := self._shared(x)) is not None:
                return channel.all_to_all(x)
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x.contiguous(), group=self.group)
            return out
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.group)
        return out

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """`[start, stop)` of part `index` when `total` items are cut into `parts` nearly equal pieces; the first
    `total % parts` pieces get one more, so uneven remainders are allowed."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)

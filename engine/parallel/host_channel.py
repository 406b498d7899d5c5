"""Collectives between the CPU ranks of one host through shared memory, as vLLM's CPU backend runs its tensor
parallelism over a shared-memory communicator instead of gloo.

gloo on one host still goes through TCP on loopback, and each of its collectives hands the data to a loop thread
of its own on each side: between two ranks on this project's 2-core machine an all-gather of a few kilobytes took
833 µs through gloo and 108 µs here (scripts/bench_collectives.py), and more when the cores are busy, since each
hand-over waits for a core. A lockstep step of the decode benchmark runs 7 of them (the control broadcast and
results gather, the pass's agreement, and per MoE layer an all-gather and a reduce-scatter), and every rank waits
through each.

Here each rank owns a region of shared memory (a file under /dev/shm, unlinked once every rank has mapped it) in
two halves, and one Unix socket to every other rank. A collective writes this rank's tensor into the half of its
region that the collective's parity picks, sends one byte to every peer and waits for one byte from each, then
reads the peers' halves directly. The socket calls order the memory (the writer's send comes after its copy, the
reader's receive before its read), a peer that dies closes its socket (the wait raises at once, not after a
timeout), and a blocked rank sleeps in the kernel, so no core spins. Two halves suffice: a rank writes a half
again only after it saw every peer's byte of the collective in between, which each peer sent only after it had
finished reading the collective before that, the last that used this half.

Only equal-sized exchanges come through here (all-gather, reduce-scatter, equal all-to-all, broadcast); one larger
than a half, or an all-to-all with uneven splits, goes to gloo, and every rank makes the same choice because it
sees the same sizes.
"""
from __future__ import annotations

import mmap
import os
import socket
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist

HALF_BYTES = 4 << 20  # per rank and parity: what the largest exchange through here may hold (8 MiB per rank)


class PeerGone(ConnectionError):
    """Another rank's socket closed or timed out during a collective: that rank died or stopped answering."""


def host_channel(group, timeout: timedelta, half_bytes: int = HALF_BYTES) -> "HostChannel | None":
    """The channel of `group`'s ranks, or None where they cannot have one: not all on one host (no shared
    /dev/shm or socket namespace), or turned off with TESSERA_HOST_CHANNEL=0. Every rank of `group` must call it
    at the same point; every rank gets the same answer."""
    if os.environ.get("TESSERA_HOST_CHANNEL", "1") == "0" or dist.get_world_size(group) == 1:
        return None
    channel = HostChannel(group, timeout.total_seconds(), half_bytes)
    if channel.open(group):
        return channel
    channel.close()
    return None


class HostChannel:
    """The ranks of a group (all on this host) exchanging tensors through shared memory (made by `host_channel`).
    Every rank calls the same collectives in the same order, as with any process group."""

    def __init__(self, group, timeout_s: float, half_bytes: int):
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.timeout_s, self.half_bytes, self.seq = timeout_s, half_bytes, 0
        self.peers: dict[int, socket.socket] = {}
        self.halves: list[list[torch.Tensor]] = []
        self._regions: list[mmap.mmap] = []

    def open(self, group) -> bool:
        """Set up this rank's region and sockets and reach every peer's; whether every rank of `group` did (each
        phase ends in an all-reduce of every rank's success, so a rank that fails makes all fall back alike)."""
        name = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(name, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
        prefix, listener, path = f"tessera-{name[0]}", None, None
        try:
            try:  # phase 1: this rank's own listener and region
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(f"\0{prefix}-{self.rank}")  # the abstract namespace: no file to clean up
                listener.listen(self.size)
                listener.settimeout(min(self.timeout_s, 30.0))  # a peer that cannot connect fails at once
                path = f"/dev/shm/{prefix}-{self.rank}"
                own = _map(path, 2 * self.half_bytes, create=True)
                ok = True
            except OSError:
                ok = False
            if not _everyone(ok, group):
                return False
            try:  # phase 2: the peers' sockets (connect to the lower ranks, accept the higher) and regions
                for peer in range(self.rank):
                    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    conn.settimeout(self.timeout_s)
                    conn.connect(f"\0{prefix}-{peer}")
                    conn.sendall(bytes([self.rank]))
                    self.peers[peer] = conn
                while len(self.peers) < self.size - 1:
                    conn, _ = listener.accept()
                    conn.settimeout(self.timeout_s)
                    self.peers[conn.recv(1)[0]] = conn
                self._regions = [own if r == self.rank else _map(f"/dev/shm/{prefix}-{r}", 2 * self.half_bytes)
                                 for r in range(self.size)]
                ok = True
            except OSError:
                ok = False
            if not _everyone(ok, group):  # also: every rank has mapped every region, so the names can go
                return False
            self.halves = [[torch.frombuffer(region, dtype=torch.uint8, count=self.half_bytes,
                                             offset=half * self.half_bytes) for half in (0, 1)]
                           for region in self._regions]
            return True
        finally:
            if listener is not None:
                listener.close()
            if path is not None and os.path.exists(path):
                os.unlink(path)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.half_bytes

    def exchange(self, x: torch.Tensor | None, like: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every rank's `x` (equal shapes and dtypes), in rank order, as views of the shared halves: valid until
        the collective after next, so copy out what is kept. A rank that only reads (a broadcast's receiver)
        passes None and `like`, a tensor of the shape and dtype to read."""
        shape_of = x if x is not None else like
        nbytes = shape_of.numel() * shape_of.element_size()
        half, self.seq = self.seq % 2, self.seq + 1
        if x is not None:
            self.halves[self.rank][half][:nbytes].copy_(x.contiguous().view(-1).view(torch.uint8))
        peer, answer = None, b"\1"
        try:
            for peer, conn in self.peers.items():
                conn.sendall(b"\1")
            for peer, conn in self.peers.items():
                if (answer := conn.recv(1)) != b"\1":  # b"": it closed its end
                    break
        except OSError as err:  # a reset or broken connection, or the timeout (TimeoutError)
            raise PeerGone(f"rank {self.rank} lost rank {peer} in a collective: {type(err).__name__}: {err}") \
                from err
        if answer != b"\1":
            raise PeerGone(f"rank {self.rank} lost rank {peer} in a collective: it closed its connection")
        return [self.halves[r][half][:nbytes].view(shape_of.dtype).view(shape_of.shape) for r in range(self.size)]

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """`x (n, ...)` of every rank → `(size * n, ...)` in rank order."""
        return torch.cat(self.exchange(x))

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """`x (size * n, ...)` of every rank → the sum over ranks of rows `[rank n, (rank + 1) n)`."""
        n = x.shape[0] // self.size
        # summed as gloo's path sums (one reduction over the stacked parts), so both give the same bits
        return torch.stack([whole[self.rank * n: (self.rank + 1) * n] for whole in self.exchange(x)]).sum(0)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of `x` in equal splits by destination rank → the rows each rank sent here, by source."""
        n = x.shape[0] // self.size
        return torch.cat([whole[self.rank * n: (self.rank + 1) * n] for whole in self.exchange(x)])

    def broadcast(self, x: torch.Tensor, src: int) -> None:
        """`x` of rank `src`, into `x` on every rank."""
        if self.rank == src:
            self.exchange(x)
        else:
            x.copy_(self.exchange(None, like=x)[src])

    def close(self) -> None:
        for conn in self.peers.values():
            conn.close()
        self.peers.clear()


def _map(path: str, size: int, create: bool = False) -> mmap.mmap:
    fd = os.open(path, (os.O_CREAT | os.O_EXCL | os.O_RDWR) if create else os.O_RDWR, 0o600)
    try:
        if create:  # reserved now: a /dev/shm too small (a container's 64 MB) fails here, not with SIGBUS later
            os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _everyone(ok: bool, group) -> bool:
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())

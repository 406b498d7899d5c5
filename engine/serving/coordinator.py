"""Rank 0 sends each operation to every rank and collects their results; the other ranks follow.

The control messages (small Python objects: token ids, parameters, results) travel over a gloo group of their
own, so the data path (NCCL on GPUs) carries only the MoE layers' tensors. Every collective has a timeout: a rank
that dies makes the others raise instead of waiting forever.

A step's control is two collectives: one broadcast of the operation and one all-gather of the results, each a
fixed-size frame that holds the message's length and, mostly, all of it; a longer message sends its rest in a
second collective. torch's broadcast_object_list and gather_object each take two collectives (the sizes, then the
data) even for a few bytes, and every collective is a rendezvous of all ranks on the step's critical path. For a
step that places two requests and returns 64 results, on 2 CPU ranks of a loaded machine: 2.6-3.2 ms per step
with those, 1.5-2.0 ms with the frames. CPU ranks of one host send the frames through shared memory
(`engine.parallel.host_channel`), as their MoE layers do.
"""
from __future__ import annotations

import os
import pickle
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.parallel.host_channel import HostChannel, host_channel
from engine.serving.runner import Runner


class RankFailure(RuntimeError):
    """Another rank stopped answering: the server cannot go on."""


class StepCannotPair(RuntimeError):
    """A forward pass failed on a rank in lockstep with others: they may be waiting in one of its collectives,
    which it can no longer pair one to one, so it cannot go on (the server exits non-zero, never hangs). With
    one rank there is nothing to pair: the step's requests fail and the rank goes on."""


FRAME_BYTES = 1 << 15  # one control message's first collective: 8 bytes of length, then the message
_LENGTH = 8


def _frame(data: bytes) -> torch.Tensor:
    frame = torch.zeros(FRAME_BYTES, dtype=torch.uint8)
    head = len(data).to_bytes(_LENGTH, "little") + data[: FRAME_BYTES - _LENGTH]
    frame[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    return frame


def _unframe(frame: torch.Tensor | bytes) -> tuple[int, bytes]:
    """(the whole message's length, the part of it in this frame)."""
    raw = frame if isinstance(frame, bytes) else frame.numpy().tobytes()
    length = int.from_bytes(raw[:_LENGTH], "little")
    return length, raw[_LENGTH: _LENGTH + min(length, FRAME_BYTES - _LENGTH)]


def _bytes(data: bytes, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.uint8)
    if data:
        out[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def _broadcast(x: torch.Tensor, group, channel: HostChannel | None) -> None:
    if channel is not None and channel.fits(x.numel()):
        channel.broadcast(x, src=0)
    else:
        dist.broadcast(x, src=0, group=group)


def _all_gather(x: torch.Tensor, world: int, group, channel: HostChannel | None) -> list[bytes]:
    if channel is not None and channel.fits(x.numel()):
        return [part.numpy().tobytes() for part in channel.exchange(x)]
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return [part.numpy().tobytes() for part in parts]


def broadcast_message(obj, rank: int, group, channel: HostChannel | None = None) -> object:
    """Rank 0's `obj` on every rank (others pass None)."""
    data = pickle.dumps(obj) if rank == 0 else b""
    frame = _frame(data)
    _broadcast(frame, group, channel)
    length, body = _unframe(frame)
    if length > len(body):  # the rest, in a second broadcast that every rank knows to expect
        rest = _bytes(data[len(body):], length - len(body))
        _broadcast(rest, group, channel)
        body += rest.numpy().tobytes()
    return pickle.loads(body)


def all_gather_messages(obj, world: int, group, channel: HostChannel | None = None) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    data = pickle.dumps(obj)
    parts = [_unframe(frame) for frame in _all_gather(_frame(data), world, group, channel)]
    longest_rest = max(length - len(body) for length, body in parts)
    if longest_rest > 0:  # every rank sees every length, so all of them take part in the second all-gather
        rests = _all_gather(_bytes(data[FRAME_BYTES - _LENGTH:], longest_rest), world, group, channel)
        parts = [(length, body + rest[: length - len(body)]) for (length, body), rest in zip(parts, rests)]
    return [pickle.loads(body) for _, body in parts]


class Coordinator:
    def __init__(self, runner: Runner, world: int = 1, timeout_s: float = 60.0):
        self.runner, self.world = runner, world
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if world > 1 else None
        # frames, and most rests: a longer message's rest goes through gloo
        self.channel = host_channel(self.group, timedelta(seconds=timeout_s), half_bytes=1 << 20) if world > 1 \
            else None

    def execute(self, op: dict, streamer=None, cancelled=None) -> list[dict]:
        """Run `op` on every rank; returns one result per rank."""
        if self.world == 1:
            return [self.runner.run(op, streamer, cancelled)]
        try:
            broadcast_message(op, 0, self.group, self.channel)
            try:
                mine = self.runner.run(op, streamer, cancelled)
            except StepCannotPair as err:  # the others may wait in a collective of this pass: all must stop
                raise RankFailure(f"the step failed on rank 0 in lockstep with the other ranks: {err}") from err
            results = all_gather_messages(mine, self.world, self.group, self.channel)
        except RankFailure:
            raise
        except (RuntimeError, ConnectionError) as err:  # gloo reports a lost peer or a timeout as RuntimeError
            raise RankFailure(f"a worker rank failed during {op['type']!r}: {err}") from err
        return results

    def stop(self) -> None:
        if self.world > 1:
            broadcast_message({"type": "stop"}, 0, self.group, self.channel)


def follow(coordinator: Coordinator) -> None:
    """The loop of ranks other than 0: run what rank 0 sends until it says stop."""
    runner = coordinator.runner
    while True:
        op = broadcast_message(None, runner.rank, coordinator.group, coordinator.channel)
        if op["type"] == "stop":
            return
        try:
            result = runner.run(op)
        except StepCannotPair as err:  # exiting closes this rank's connections: the others stop waiting on it
            print(f"tessera serve: the step failed on rank {runner.rank} in lockstep with the other ranks: {err}; "
                  "exiting", flush=True)
            os._exit(1)
        all_gather_messages(result, coordinator.world, coordinator.group, coordinator.channel)

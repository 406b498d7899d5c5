"""Rank 0 sends each operation to every rank and collects their results; the other ranks follow.

The control messages (small Python objects: token ids, parameters, results) travel over a gloo group of their
own, so the data path (NCCL on GPUs) carries only the MoE layers' tensors. Every collective has a timeout: a rank
that dies makes the others raise instead of waiting forever.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from engine.serving.runner import Runner


class RankFailure(RuntimeError):
    """Another rank stopped answering: the server cannot go on."""


class StepCannotPair(RuntimeError):
    """A forward pass failed on a rank in lockstep with others: they may be waiting in one of its collectives,
    which it can no longer pair one to one, so it cannot go on (the server exits non-zero, never hangs). With
    one rank there is nothing to pair: the step's requests fail and the rank goes on."""


class Coordinator:
    def __init__(self, runner: Runner, world: int = 1, timeout_s: float = 60.0):
        self.runner, self.world = runner, world
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if world > 1 else None

    def execute(self, op: dict, streamer=None, cancelled=None) -> list[dict]:
        """Run `op` on every rank; returns one result per rank."""
        if self.world == 1:
            return [self.runner.run(op, streamer, cancelled)]
        try:
            dist.broadcast_object_list([op], src=0, group=self.group)
            try:
                mine = self.runner.run(op, streamer, cancelled)
            except StepCannotPair as err:  # the others may wait in a collective of this pass: all must stop
                raise RankFailure(f"the step failed on rank 0 in lockstep with the other ranks: {err}") from err
            results = [None] * self.world
            dist.gather_object(mine, results, dst=0, group=self.group)
        except RankFailure:
            raise
        except (RuntimeError, ConnectionError) as err:  # gloo reports a lost peer or a timeout as RuntimeError
            raise RankFailure(f"a worker rank failed during {op['type']!r}: {err}") from err
        return results

    def stop(self) -> None:
        if self.world > 1:
            dist.broadcast_object_list([{"type": "stop"}], src=0, group=self.group)


def follow(coordinator: Coordinator) -> None:
    """The loop of ranks other than 0: run what rank 0 sends until it says stop."""
    runner = coordinator.runner
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=coordinator.group)
        op = box[0]
        if op["type"] == "stop":
            return
        try:
            result = runner.run(op)
        except StepCannotPair as err:  # exiting closes this rank's connections: the others stop waiting on it
            print(f"tessera serve: the step failed on rank {runner.rank} in lockstep with the other ranks: {err}; "
                  "exiting", flush=True)
            os._exit(1)
        dist.gather_object(result, None, dst=0, group=coordinator.group)

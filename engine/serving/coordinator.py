"""Rank 0 sends each operation to every rank and collects their results; the other ranks follow.

The control messages (small Python objects: token ids, parameters, results) travel over a gloo group of their
own, so the data path (NCCL on GPUs) carries only the MoE layers' tensors. Every collective has a timeout: a rank
that dies makes the others raise instead of waiting forever.
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from engine.serving.runner import Runner


class RankFailure(RuntimeError):
    """Another rank stopped answering: the server cannot go on."""


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
            mine = self.runner.run(op, streamer, cancelled)
            results = [None] * self.world
            dist.gather_object(mine, results, dst=0, group=self.group)
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
        dist.gather_object(runner.run(op), None, dst=0, group=coordinator.group)

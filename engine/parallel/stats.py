"""Counters a distributed model keeps when asked (benchmarks, tests): host synchronisations of its passes,
bytes this rank put on the wire, expert rows it computed, tokens dropped, `auto`'s choices, time inside expert
kernels. Byte counts are host integers known before
each collective; row and drop counts stay on the device until read, so counting adds no synchronisation."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from foundation.timing import timed


class ExchangeStats:
    def __init__(self, time_compute: bool = False):
        self.time_compute = time_compute
        self.reset()

    def reset(self) -> None:
        self.host_syncs = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0
        self.compute_s = 0.0
        self._rows: list[torch.Tensor] = []
        self._host_rows = 0
        self._dropped: list[torch.Tensor] = []
        self.choices: dict[str, int] = {}

    def add_rows(self, rows: "torch.Tensor | int") -> None:
        if isinstance(rows, int):
            self._host_rows += rows
        else:
            self._rows.append(rows.detach().reshape(()).to(torch.int64))

    def add_dropped(self, dropped: torch.Tensor) -> None:
        self._dropped.append(dropped.detach().reshape(()).to(torch.int64))

    @property
    def rows_computed(self) -> int:
        return self._host_rows + sum(int(r) for r in self._rows)

    @property
    def tokens_dropped(self) -> int:
        return sum(int(d) for d in self._dropped)

    @contextmanager
    def timing(self, device: torch.device):
        """Wall time of expert compute. Synchronises CUDA around the kernels: use only when measuring balance."""
        with timed(device) as elapsed:
            yield
        self.compute_s += elapsed.seconds

    def summary(self) -> dict:
        return {"host_syncs": self.host_syncs, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "calls": self.calls, "rows_computed": self.rows_computed, "tokens_dropped": self.tokens_dropped,
                "compute_s": self.compute_s, "choices": dict(self.choices)}


def maybe_timing(stats: ExchangeStats | None, device: torch.device):
    return stats.timing(device) if stats is not None and stats.time_compute else nullcontext()

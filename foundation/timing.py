"""Wall time of callables and blocks (CUDA event time where asked), the one way the demo, the cost model, the
layer stats and the benchmarks measure it."""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch


class Elapsed:
    seconds = 0.0


@contextlib.contextmanager
def timed(device):
    """Wall time of the body, CUDA synchronised before and after so the kernels it queued are counted; read
    `.seconds` of what it yields once the body is done."""
    elapsed = Elapsed()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield elapsed
    if cuda:
        torch.cuda.synchronize(device)
    elapsed.seconds = time.perf_counter() - start


def seconds(fn: Callable, device) -> float:
    """One call's wall time."""
    with timed(device) as elapsed:
        fn()
    return elapsed.seconds


def event_seconds(fn: Callable, device) -> float:
    """One call's device time between CUDA events (no host synchronisation inside the span, so a single short
    kernel is not inflated by it); wall time off CUDA."""
    if torch.device(device).type != "cuda":
        return seconds(fn, device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3


def best_seconds(fns: dict[str, Callable], device, repeats: int, *, warmup: int = 1,
                 once: Callable[[Callable, object], float] = seconds) -> dict[str, float]:
    """Best-of-`repeats` time of each callable, run round-robin: load elsewhere on the machine only ever adds
    time, and hits every callable alike. `once(fn, device)` times one call (e.g. the slowest rank's)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], once(fn, device))
    return best

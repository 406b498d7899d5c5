"""Device cache of adapter weights: a byte budget, LRU eviction back to host memory, pins for running batches.

The budget is spent up front on fixed-size slots (per module one [slots, r, in] and one [slots, out, r]
tensor), so loading an adapter is a copy into a free slot and never fragments device memory. The pool keeps
every adapter on the host, so eviction only forgets the slot. A batch pins its adapters' slots for its whole
forward/generate; eviction only takes unpinned slots, and on CUDA a later copy into a freed slot is queued on
the same stream after the kernels of the batch that used it, so a running batch never sees its weights change.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

import torch

from engine.lora.adapters import AdapterPool
from engine.lora.errors import CacheFullError


class AdapterCache:
    """Slots for `capacity` adapters of `pool` on `device`, filled on demand."""

    def __init__(self, pool: AdapterPool, device, dtype: torch.dtype, budget_bytes: int | None = None):
        self.pool, self.device, self.dtype = pool, torch.device(device), dtype
        self.bytes_per_adapter = self.adapter_bytes(pool, dtype)
        if budget_bytes is None:
            capacity = max(1, len(pool))
        else:
            capacity = int(budget_bytes) // self.bytes_per_adapter
            if capacity < 1:
                raise CacheFullError(f"a budget of {budget_bytes} bytes cannot hold one adapter "
                                     f"({self.bytes_per_adapter} bytes)")
            capacity = min(capacity, max(1, len(pool)))
        self.budget_bytes = budget_bytes
        self.capacity = capacity
        rank = pool.rank
        self._stacks = {
            module: (torch.zeros(capacity, rank, d_in, device=self.device, dtype=dtype),
                     torch.zeros(capacity, d_out, rank, device=self.device, dtype=dtype))
            for module, (d_in, d_out) in pool.shapes.items()
        }
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._pins: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._lock = threading.Lock()
        self.loads = self.evictions = self.hits = 0

    @staticmethod
    def adapter_bytes(pool: AdapterPool, dtype: torch.dtype) -> int:
        """Device bytes one adapter occupies in `dtype`."""
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(pool.rank * (d_in + d_out) * elem for d_in, d_out in pool.shapes.values())

    @property
    def bytes_used(self) -> int:
        return len(self._resident) * self.bytes_per_adapter

    @property
    def bytes_reserved(self) -> int:
        return self.capacity * self.bytes_per_adapter

    def resident(self) -> list[str]:
        """Adapter names on the device, least recently used first."""
        return list(self._resident)

    def stacks(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._stacks[module]

    def acquire(self, names: Iterable[str]) -> dict[str, int]:
        """Make `names` resident, pin them, and return name -> slot. Pair with `release`."""
        names = list(dict.fromkeys(names))
        for name in names:
            self.pool.spec(name)
        with self._lock:
            pinned_now = {n for n in names if n in self._resident}
            missing = [n for n in names if n not in self._resident]
            evictable = [n for n in self._resident if n not in self._pins and n not in pinned_now]
            if len(missing) > len(self._free) + len(evictable):
                raise CacheFullError(f"the batch needs {len(missing)} more adapters but the cache has "
                                     f"{len(self._free)} free and {len(evictable)} evictable slots "
                                     f"(capacity {self.capacity}); raise the byte budget or shrink the batch")
            slots = {}
            for name in names:
                if name in self._resident:
                    self.hits += 1
                    self._resident.move_to_end(name)
                else:
                    self._load(name, self._take_slot(names))
                slots[name] = self._resident[name]
                self._pins[name] = self._pins.get(name, 0) + 1
            return slots

    def release(self, names: Iterable[str]) -> None:
        with self._lock:
            for name in dict.fromkeys(names):
                count = self._pins.get(name, 0) - 1
                if count > 0:
                    self._pins[name] = count
                else:
                    self._pins.pop(name, None)

    def _take_slot(self, wanted: list[str]) -> int:
        if self._free:
            return self._free.pop()
        for victim in self._resident:  # least recently used first
            if victim not in self._pins and victim not in wanted:
                self.evictions += 1
                return self._resident.pop(victim)
        raise CacheFullError("no evictable adapter slot")  # acquire() checked capacity, so this is a bug

    def _load(self, name: str, slot: int) -> None:
        for module, (a, b) in self.pool.host_weights(name).items():
            a_stack, b_stack = self._stacks[module]
            a_stack[slot].copy_(a.to(self.dtype), non_blocking=True)
            b_stack[slot].copy_(b.to(self.dtype), non_blocking=True)
        self._resident[name] = slot
        self.loads += 1

    def grow(self) -> None:
        """Unbounded caches (no byte budget) grow to the pool's size when adapters are added later."""
        if self.budget_bytes is not None or len(self.pool) <= self.capacity:
            return
        with self._lock:
            extra = len(self.pool) - self.capacity
            for module, (a_stack, b_stack) in self._stacks.items():
                self._stacks[module] = (torch.cat([a_stack, a_stack.new_zeros(extra, *a_stack.shape[1:])]),
                                        torch.cat([b_stack, b_stack.new_zeros(extra, *b_stack.shape[1:])]))
            self._free = list(range(len(self.pool) - 1, self.capacity - 1, -1)) + self._free
            self.capacity = len(self.pool)

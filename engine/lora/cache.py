"""Device cache of adapter weights: a byte budget, LRU eviction back to host memory, pins for running batches.

The budget is spent up front on fixed-size slots, so loading an adapter is a copy into a free slot and never
fragments device memory. Per linear module there is one `[slots, R, in]` A stack, one `[slots, out, R]` B stack
and one `[slots]` fp32 scale vector, where R is the largest rank any adapter of the pool has for that module;
an expert parameter has `[slots, E, R, in]` and `[slots, E, out, R]` stacks. A smaller rank is zero-padded and
a module an adapter does not adapt is an all-zero slot with scale 0, so both add exact zeros.

The pool keeps every adapter on the host, so eviction only forgets the slot. A batch pins its adapters' slots
for its whole forward/generate; eviction only takes unpinned slots, and on CUDA a later copy into a freed slot
is queued on the same stream after the kernels of the batch that used it, so a running batch never sees its
weights change. When the pool's layout changes (an adapter with a new module or a larger rank is loaded), the
stacks are re-allocated with every slot keeping its index and its (re-padded) contents.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

import torch

from engine.lora.adapters import AdapterPool
from engine.lora.errors import AdapterError, CacheFullError


def _layout(pool: AdapterPool) -> dict[str, tuple[int, ...]]:
    """module -> (R, in, out) for linear modules and (E, R, in, out) for expert parameters."""
    ranks = pool.module_ranks()
    out = {m: (ranks[m], d_in, d_out) for m, (d_in, d_out) in pool.shapes.items()}
    out.update({k: (e, ranks[k], d_in, d_out) for k, (e, d_in, d_out) in pool.expert_shapes.items()})
    return out


def _layout_bytes(layout: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    total = 0
    for dims in layout.values():
        experts = dims[0] if len(dims) == 4 else 1
        rank, d_in, d_out = dims[-3:]
        total += experts * rank * (d_in + d_out) * elem
    return total


class AdapterCache:
    """Slots for `capacity` adapters of `pool` on `device`, filled on demand."""

    def __init__(self, pool: AdapterPool, device, dtype: torch.dtype, budget_bytes: int | None = None):
        self.pool, self.device, self.dtype = pool, torch.device(device), dtype
        self.budget_bytes = budget_bytes
        self._layout: dict[str, tuple[int, ...]] = {}
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scales: dict[str, torch.Tensor] = {}
        self.capacity = 0
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._pins: dict[str, int] = {}
        self._free: list[int] = []
        self._lock = threading.RLock()
        self.loads = self.evictions = self.hits = 0
        self._pool_version = -1
        self.refresh()

    @staticmethod
    def adapter_bytes(pool: AdapterPool, dtype: torch.dtype) -> int:
        """Device bytes one slot occupies in `dtype` (every module at the pool's padded rank)."""
        return _layout_bytes(_layout(pool), dtype)

    @property
    def bytes_per_adapter(self) -> int:
        return _layout_bytes(self._layout, self.dtype)

    @property
    def bytes_used(self) -> int:
        return len(self._resident) * self.bytes_per_adapter

    @property
    def bytes_reserved(self) -> int:
        return self.capacity * self.bytes_per_adapter

    def resident(self) -> list[str]:
        """Adapter names on the device, least recently used first."""
        return list(self._resident)

    def modules(self) -> list[str]:
        return [m for m, dims in self._layout.items() if len(dims) == 3]

    def expert_parameters(self) -> list[str]:
        return [m for m, dims in self._layout.items() if len(dims) == 4]

    def has(self, module: str) -> bool:
        """Whether any adapter of the pool adapts `module` (a wrapped layer whose adapters left adds nothing)."""
        return module in self._stacks

    def stacks(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._stacks[module]

    def scales(self, module: str) -> torch.Tensor:
        """[slots] fp32: each slot's LoRA scale for `module` (0 where its adapter does not adapt it)."""
        return self._scales[module]

    def pinned(self, name: str) -> int:
        """How many running batches hold `name`."""
        return self._pins.get(name, 0)

    # ---- layout ----------------------------------------------------------------------------------------
    def _target_capacity(self, layout) -> int:
        wanted = max(1, len(self.pool))
        if self.budget_bytes is None:
            return max(wanted, self.capacity)
        per = _layout_bytes(layout, self.dtype)
        fit = int(self.budget_bytes) // per if per else wanted
        if fit < 1:
            raise CacheFullError(f"a budget of {self.budget_bytes} bytes cannot hold one adapter ({per} bytes)")
        return min(fit, max(wanted, self.capacity))

    def check_refresh(self) -> None:
        """Raise CacheFullError if `refresh` would have to evict an adapter a running batch holds."""
        with self._lock:
            capacity = self._target_capacity(_layout(self.pool))
            held = sorted(n for n, s in self._resident.items() if s >= capacity and n in self._pins)
            if held:
                raise CacheFullError(f"the adapters' new layout leaves room for {capacity} adapters, but "
                                     f"{held} are in use by running batches")

    def refresh(self) -> None:
        """Follow the pool: re-allocate stacks for new modules, larger ranks or a new capacity, keep every
        resident adapter in its slot (adapters gone from the pool are forgotten)."""
        with self._lock:
            if self.pool.version == self._pool_version:
                return
            self.check_refresh()
            layout = _layout(self.pool)
            capacity = self._target_capacity(layout)
            for name in [n for n in self._resident if n not in self.pool]:
                self._forget(name)
            for name in [n for n, s in self._resident.items() if s >= capacity]:
                self._resident.pop(name)
                self.evictions += 1
            self._pool_version = self.pool.version
            if layout == self._layout and capacity == self.capacity:
                return
            old_stacks, old_scales, old_cap = self._stacks, self._scales, self.capacity
            keep = min(old_cap, capacity)
            stacks, scales = {}, {}
            for module, dims in layout.items():
                experts = dims[:1] if len(dims) == 4 else ()
                rank, d_in, d_out = dims[-3:]
                # kept across passes and loaded into in place between them: normal tensors even when this runs
                # inside a step's inference mode (engine.serving.paged_batch.RankBatch.run)
                with torch.inference_mode(False):
                    a = torch.zeros(capacity, *experts, rank, d_in, device=self.device, dtype=self.dtype)
                    b = torch.zeros(capacity, *experts, d_out, rank, device=self.device, dtype=self.dtype)
                    s = torch.zeros(capacity, device=self.device, dtype=torch.float32)
                    if module in old_stacks:
                        old_a, old_b = old_stacks[module]
                        r = min(rank, old_a.shape[-2])  # a rank shrinks when its largest adapter leaves
                        a[:keep, ..., :r, :].copy_(old_a[:keep, ..., :r, :])
                        b[:keep, ..., :r].copy_(old_b[:keep, ..., :r])
                        s[:keep].copy_(old_scales[module][:keep])
                stacks[module], scales[module] = (a, b), s
            self._stacks, self._scales, self._layout = stacks, scales, layout
            used = set(self._resident.values())
            self._free = sorted((s for s in range(capacity) if s not in used), reverse=True)
            self.capacity = capacity

    def _forget(self, name: str) -> None:
        slot = self._resident.pop(name)
        for module, (a, b) in self._stacks.items():
            a[slot].zero_()
            b[slot].zero_()
            self._scales[module][slot] = 0.0
        self._free.append(slot)

    def unload(self, name: str) -> None:
        """Forget `name`'s slot; refused while a running batch holds it."""
        with self._lock:
            if self._pins.get(name):
                raise AdapterError(f"adapter {name!r} is in use by {self._pins[name]} running batch(es); unload it "
                                   "once they finish")
            if name in self._resident:
                self._forget(name)

    # ---- pins ------------------------------------------------------------------------------------------
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
        spec = self.pool.spec(name)
        weights = self.pool.host_weights(name)
        for module, (a_stack, b_stack) in self._stacks.items():
            lora = spec.modules.get(module) or spec.experts.get(module)
            a_stack[slot].zero_()
            b_stack[slot].zero_()
            if lora is None:
                self._scales[module][slot] = 0.0
                continue
            a, b = weights[module]
            a_stack[slot][..., :lora.rank, :].copy_(a.to(self.dtype), non_blocking=True)
            b_stack[slot][..., :lora.rank].copy_(b.to(self.dtype), non_blocking=True)
            self._scales[module][slot] = lora.scale
        self._resident[name] = slot
        self.loads += 1

"""Watch what an MoE layer asks of the device, on a CPU: which aten ops would force a host synchronisation on
CUDA, and how many kernels it would launch.

`SyncGuard` is a TorchDispatchMode: it sees every aten op below autograd, raises on the ops that read device
values back to the host on CUDA (their output size or value depends on data), and counts the ops that would
launch a CUDA kernel (everything but views, metadata and bare allocations). A few host reads never reach the
dispatcher on CPU tensors (`.tolist()`, `.cpu()`, `.numpy()` return without an op), so the guard also wraps
those methods while it is active.

`mocked_triton()` replaces every Triton launch with a record of the kernel's name and grid. Triton's
interpreter copies tensors to and from numpy around each program; running it would hide the launcher's torch
glue behind its own host copies, so under the guard the kernels do not run (their outputs keep whatever
`torch.empty` gave them: only the op stream is checked, not the numbers).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class HostSync(AssertionError):
    """An op in an MoE layer that would wait for the GPU."""


# Ops whose result (a size or a host value) is known only after the device has computed their input.
SYNCING_OPS = {
    aten._local_scalar_dense.default: "item()/int()/bool() of a tensor",
    aten.nonzero.default: "nonzero (torch.where(cond), argwhere)",
    aten.nonzero.out: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.bincount.default: "bincount (its length depends on the data)",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
    aten._unique.default: "unique",
    aten.equal.default: "torch.equal",
    aten.is_nonzero.default: "bool() of a tensor",
    aten.lift_fresh.default: "torch.tensor(host data): on CUDA a synchronous host-to-device copy",
}
# Ops that only make views, read metadata or allocate: no kernel runs.
NO_LAUNCH = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    aten.sym_storage_offset.default, aten.is_contiguous.default, aten.set_.source_Storage,
}


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None)


class SyncGuard(TorchDispatchMode):
    """Raise on host synchronisations; count kernel launches (`launches`: op names in order). Triton launches
    recorded by `mocked_triton` are appended to the same list as `triton:<kernel>`."""

    def __init__(self):
        super().__init__()
        self.launches: list[str] = []
        self._patches = contextlib.ExitStack()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if func in SYNCING_OPS:
            raise HostSync(f"{func}: {SYNCING_OPS[func]} reads the device back to the host on CUDA")
        if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_) and _bool_index(args[1]):
            raise HostSync(f"{func} with a boolean mask: the result size depends on the data")
        if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor \
                and kwargs.get("output_size") is None:
            raise HostSync("repeat_interleave with tensor repeats and no output_size")
        if func not in NO_LAUNCH and not func.is_view:
            self.launches.append(str(packet.__name__))
        return func(*args, **kwargs)

    def __enter__(self):
        def refuse(name):
            def method(self, *args, **kwargs):
                raise HostSync(f"Tensor.{name}() copies to the host")
            return method

        for name in ("tolist", "cpu", "numpy"):
            self._patches.enter_context(_patched(torch.Tensor, name, refuse(name)))
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)

    def triton_launches(self) -> list[str]:
        return [name for name in self.launches if name.startswith("triton:")]


@contextlib.contextmanager
def _patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def mocked_triton(guard: SyncGuard | None = None):
    """Triton launches record `triton:<name>` (into `guard.launches` when given) instead of running. The grid
    is evaluated as a launch would, so a grid that reads a device value is caught too."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    records = guard.launches if guard is not None else []

    def run(self, *args, grid, warmup, **kwargs):
        if callable(grid):
            grid = grid(kwargs)
        if not all(isinstance(g, int) for g in grid):
            raise HostSync(f"grid of {self.fn.__name__} is not host integers: {grid}")
        records.append(f"triton:{self.fn.__name__}")

    with _patched(InterpretedFunction, "run", run), _patched(JITFunction, "run", run):
        yield records


@contextlib.contextmanager
def guarded_layers(guard: SyncGuard):
    """Every MoEBlock forward runs under the guard (the rest of a Hugging Face model is not ours to check)."""
    from engine.moe.layer import MoEBlock

    original = MoEBlock.forward

    def forward_under_guard(self, hidden_states):
        with guard:
            return original(self, hidden_states)

    MoEBlock.forward = forward_under_guard
    try:
        yield guard
    finally:
        MoEBlock.forward = original

"""Name the kernel, its configuration and the device when a Triton launch fails.

Triton's own errors (`OutOfResources`, compilation errors) say what ran out but not which of a layer's kernels
asked, with which block sizes, on which GPU. Every Triton launch goes through a `run(self, *args, grid, warmup,
**kwargs)` frame of the kernel object, so the innermost such frame of the traceback holds the kernel's name and
its keyword arguments (the block sizes and launch options): enough to say exactly what failed.
"""
from __future__ import annotations

import torch

from tessera_kernels.moe_configs import device_label


class KernelLaunchError(RuntimeError):
    """A kernel launch failed; the message names kernel, configuration and device."""


def _innermost_launch(tb) -> tuple[str, dict] | None:
    found = None
    while tb is not None:
        frame = tb.tb_frame
        fn = getattr(frame.f_locals.get("self"), "fn", None)
        if fn is not None and "grid" in frame.f_locals and "kwargs" in frame.f_locals:
            config = {k: v for k, v in frame.f_locals["kwargs"].items() if isinstance(v, (int, float, bool, str))}
            found = (getattr(fn, "__name__", str(fn)), config)
        tb = tb.tb_next
    return found


def failed_launch(err: BaseException) -> tuple[str, dict, BaseException] | None:
    """(kernel name, its keyword arguments, the error it raised) of the innermost Triton launch in `err`'s
    traceback or in those of its causes (a launcher may re-raise with context), or None."""
    found = None
    while err is not None:
        launch = _innermost_launch(err.__traceback__)
        if launch is not None:
            found = (*launch, err)
        err = err.__cause__
    return found


def explain_launch_failure(err: Exception, device: torch.device, what: str) -> Exception:
    """A `KernelLaunchError` naming the failed launch when `err` came from one, else `err` itself."""
    launch = failed_launch(err)
    if launch is None:
        return err
    kernel, config, cause = launch
    return KernelLaunchError(f"{what}: Triton kernel {kernel} failed on {device_label(device)} with configuration "
                             f"{config}: {type(cause).__name__}: {cause}")

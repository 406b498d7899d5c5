"""Triton kernels, each with a plain-PyTorch reference beside it.

`tessera_kernels.triton_available()` says whether Triton kernels can run here: on CUDA tensors, or on CPU tensors
through Triton's interpreter (TRITON_INTERPRET=1, used by the tests).

The package is `tessera_kernels`, not `kernels`: that import name is Hugging Face's kernels package, which
transformers requires from 5.25 on and imports as it loads, so a top-level `kernels` of ours would hide it.
"""
from __future__ import annotations

import functools
import os


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device) -> bool:
    """Triton runs on CUDA devices, and on CPU only through the interpreter."""
    import torch

    if not triton_importable():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()

"""Block configurations for the MoE GEMMs: a tuned file for this device and shape when there is one, else a
table that is safe on every GPU of the device's generation.

Tuned files are `tessera_kernels/configs/E=..,N=..,K=..,device=..,dtype=...json`, one per (device name, experts, FFN
width each rank holds `N`, hidden size `K`, dtype), written by `scripts/tune_moe.py`. A file maps token counts
to configurations; a call uses the entry whose token count is nearest its own.

The safe tables are keyed by rows per expert (`tokens * top_k / E`, known on the host from shapes alone). Few
rows per expert means the GEMMs are bound by reading weights: small row blocks waste less padding and wide K
tiles stream the weights. Many rows means compute-bound: large tiles. `tessera_kernels.launch_check` compiles every
entry of every table and every tuned file for its GPUs and fails on shared memory over their limit or spills.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_SIZE_M", "num_warps", "num_stages")
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# Shared memory one block may use (bytes, opt-in maximum) by compute capability.
SHARED_MEMORY_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _cfg(m, n, k, warps, stages, group=8):
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_SIZE_M=group, num_warps=warps, num_stages=stages)


# (max rows per expert, config) in increasing order; the first bucket that fits is used. BLOCK_N is the width
# of the GEMM tile: for gated experts it holds BLOCK_N / 2 gate and BLOCK_N / 2 up columns. 4-byte dtypes run
# full-precision FMA dots (no tensor cores), which need more registers: 8 warps from 32 rows on.
SAFE_TABLES = {
    # H100/H200 (227 KiB of shared memory per block).
    ("sm90", 2): [(16, _cfg(16, 64, 128, 4, 5)), (64, _cfg(32, 128, 128, 4, 4)), (512, _cfg(64, 128, 64, 4, 4)),
                  (float("inf"), _cfg(128, 128, 64, 8, 4))],
    ("sm90", 4): [(16, _cfg(16, 64, 64, 4, 3)), (64, _cfg(32, 64, 64, 8, 3)), (512, _cfg(64, 128, 32, 8, 3)),
                  (float("inf"), _cfg(128, 128, 32, 8, 3))],
    # A100 (163 KiB).
    ("sm80", 2): [(16, _cfg(16, 64, 128, 4, 4)), (64, _cfg(32, 64, 128, 4, 4)), (256, _cfg(64, 128, 64, 4, 4)),
                  (float("inf"), _cfg(128, 128, 64, 8, 3))],
    ("sm80", 4): [(16, _cfg(16, 64, 64, 4, 3)), (64, _cfg(32, 64, 64, 8, 3)), (512, _cfg(64, 128, 32, 8, 3)),
                  (float("inf"), _cfg(128, 128, 32, 8, 3))],
    # A10/A40/L4/L40S/RTX 30xx/40xx (99 KiB).
    ("sm86", 2): [(16, _cfg(16, 64, 128, 4, 4)), (64, _cfg(32, 64, 128, 4, 3)), (256, _cfg(64, 128, 64, 4, 3)),
                  (float("inf"), _cfg(128, 128, 64, 8, 2))],
    ("sm86", 4): [(16, _cfg(16, 64, 64, 4, 3)), (64, _cfg(32, 64, 64, 8, 3)), (512, _cfg(64, 128, 32, 8, 2)),
                  (float("inf"), _cfg(128, 128, 32, 8, 2))],
}

# The registry's published MoE families: (experts, hidden, FFN width, top-k, gated, activation, routing weights
# in fp32). The tuner tunes them and the compile check compiles them, whole and as the slice of G ranks.
PUBLISHED_SHAPES = {
    "switch-base-8": (8, 768, 3072, 1, False, "relu", False),
    "switch-base-64": (64, 768, 3072, 1, False, "relu", False),
    "switch-base-128": (128, 768, 3072, 1, False, "relu", False),
    "mixtral-8x7b": (8, 4096, 14336, 2, True, "silu", True),
    "qwen1.5-moe-a2.7b": (60, 2048, 1408, 4, True, "silu", False),
    "qwen3-30b-a3b": (128, 2048, 768, 8, True, "silu", False),
    "olmoe-1b-7b": (64, 2048, 1024, 8, True, "silu", False),
}
SLICES = (1, 2, 4, 8)  # MoEShard ranks: each holds F / G columns of every expert

# Triton's interpreter runs each program in numpy: larger tiles mean fewer programs; padding cost is small.
INTERPRETER_CONFIG = _cfg(16, 64, 64, 4, 1, group=1)


def generation(arch: int) -> str:
    """The safe table a compute capability uses, by how much shared memory its blocks get."""
    if arch in (80, 87):
        return "sm80"
    if arch >= 90 and arch not in (120, 121):
        return "sm90"
    return "sm86"


def safe_config(arch: int, rows_per_expert: float, dtype: torch.dtype) -> dict:
    for bound, config in SAFE_TABLES[generation(arch), 4 if dtype.itemsize >= 4 else 2]:
        if rows_per_expert <= bound:
            return dict(config)
    raise AssertionError("the last bucket is unbounded")


def config_file_name(device_name: str, num_experts: int, n: int, k: int, dtype: torch.dtype) -> str:
    return f"E={num_experts},N={n},K={k},device={device_name.replace(' ', '_')},dtype={DTYPE_NAMES[dtype]}.json"


@functools.cache
def tuned_configs(path: Path) -> dict[int, dict] | None:
    """Token count -> config from a tuned file, or None when there is no such file."""
    if not path.is_file():
        return None
    table = json.loads(path.read_text())["configs"]
    configs = {}
    for tokens, config in table.items():
        missing = [key for key in CONFIG_KEYS if key not in config]
        if missing:
            raise ValueError(f"{path}: the entry for {tokens} tokens lacks {missing}")
        configs[int(tokens)] = {key: int(config[key]) for key in CONFIG_KEYS}
    return configs


@functools.cache
def _cuda_identity(index: int) -> tuple[str, int]:
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), major * 10 + minor


def device_identity(device) -> tuple[str, int] | None:
    """(device name, compute capability) of a CUDA device; for the meta device (compile checks) those of the
    target Triton compiles for; None on CPU (Triton's interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_identity(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "meta":
        from triton.runtime import driver

        active = driver.active
        return getattr(active, "device_name", "unknown"), active.get_current_target().arch
    return None


def device_label(device) -> str:
    """A device's name and compute capability for messages, `NAME (sm_XY)` (the meta device: its compile
    target); off CUDA, its type."""
    identity = device_identity(device)
    if identity is None:
        return f"{torch.device(device).type} (Triton interpreter)"
    return f"{identity[0]} (sm_{identity[1]})"


def config_for(identity: tuple[str, int], num_tokens: int, top_k: int, num_experts: int, n: int, k: int,
               dtype: torch.dtype, config_dir: Path = CONFIG_DIR) -> dict:
    """The tuned entry nearest `num_tokens` for this device and shape, else the generation's safe table."""
    name, arch = identity
    if dtype in DTYPE_NAMES:
        tuned = tuned_configs(Path(config_dir) / config_file_name(name, num_experts, n, k, dtype))
        if tuned:
            return dict(tuned[min(tuned, key=lambda tokens: (abs(tokens - num_tokens), tokens))])
    return safe_config(arch, num_tokens * top_k / max(num_experts, 1), dtype)


def moe_kernel_config(num_tokens: int, top_k: int, num_experts: int, n: int, k: int, dtype: torch.dtype,
                      device) -> dict:
    """Block sizes and launch options for both expert GEMMs of one MoE layer call (`n` = FFN width held,
    `k` = hidden size)."""
    identity = device_identity(device)
    if identity is None:
        return dict(INTERPRETER_CONFIG)
    return config_for(identity, num_tokens, top_k, num_experts, n, k, dtype)

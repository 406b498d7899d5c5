"""Tune the MoE GEMM block configurations on this GPU and write them beside the kernels
(tessera_kernels/configs/*.json).

For each published family (`tessera_kernels.moe_configs.PUBLISHED_SHAPES`), as the slice each of G ranks holds, and
each token count, time the whole `fused_experts` call (align, up, down, combine) for every candidate of a
small search space plus the safe table's choice, and keep the fastest. One file per (device, E, N, K, dtype),
the key `tessera_kernels.moe_configs` looks up; `tessera_kernels.launch_check` then compiles every file for its GPU.

    python scripts/tune_moe.py --dry-run                        # list the shapes (works without a GPU)
    python scripts/tune_moe.py                                  # registry shapes, bf16, G = 1, short search
    python scripts/tune_moe.py --families mixtral-8x7b --slices 1 2 --tokens 1 64 4096 --full
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from foundation.atomic import write_json  # noqa: E402
from tessera_kernels.moe_configs import (CONFIG_DIR, CONFIG_KEYS, DTYPE_NAMES, PUBLISHED_SHAPES,  # noqa: E402
                                         config_file_name, moe_kernel_config)

DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)


def candidates(rows_per_expert: float, itemsize: int, shared_limit: int, full: bool) -> list[dict]:
    """The search space for one token count: row blocks no larger than the rows each expert gets, tiles whose
    pipelined buffers fit the GPU's shared memory."""
    block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * rows_per_expert)]
    block_ms = block_ms if full else block_ms[-2:]
    space = []
    for m, n, k, stages in itertools.product(block_ms, (64, 128, 256), (32, 64, 128), (2, 3, 4, 5)):
        if not full and (stages not in (3, 4) or k == 32 or (k == 128 and m > 32)):
            continue
        if stages * (m * k + k * n) * itemsize > shared_limit:
            continue
        warps_choices = (4, 8) if full else (8 if m * n >= 128 * 128 else 4,)
        for warps in warps_choices:
            for group in ((1, 8) if full else (8,)):
                space.append(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_SIZE_M=group, num_warps=warps,
                                  num_stages=stages))
    return space


def problem(family: str, slices: int, tokens: int, dtype, device, seed: int = 0):
    experts, hidden, ffn, top_k, gated, activation, fp32_weights = PUBLISHED_SHAPES[family]
    width = -(-ffn // slices)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = (torch.randn(experts, 2 * width if gated else width, hidden, generator=gen) * hidden ** -0.5)
    first = first.to(device=device, dtype=dtype)
    w1, w3 = (first[:, :width], first[:, width:]) if gated else (first, None)
    w2 = (torch.randn(experts, hidden, width, generator=gen) * width ** -0.5).to(device=device, dtype=dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k].to(device)
    weights = torch.rand(tokens, top_k, generator=gen).to(device=device,
                                                           dtype=torch.float32 if fp32_weights else dtype)
    return (x, ids, weights, w1, w2, w3, activation), (experts, width, hidden)


def tune_one(family, slices, dtype, token_counts, full, device) -> tuple[dict, dict]:
    import triton
    from triton.runtime.errors import OutOfResources

    from tessera_kernels.fused_moe import fused_experts

    shared_limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    configs, timings = {}, {}
    for tokens in token_counts:
        args, (experts, width, hidden) = problem(family, slices, tokens, dtype, device)
        top_k = args[1].shape[1]
        safe = moe_kernel_config(tokens, top_k, experts, width, hidden, dtype, device)
        space = [safe] + candidates(tokens * top_k / experts, dtype.itemsize, shared_limit, full)
        best = None
        for config in space:
            try:
                ms = triton.testing.do_bench(lambda c=config: fused_experts(*args, config=c), warmup=5, rep=20)
            except OutOfResources:
                continue
            if best is None or ms < best[0]:
                best = (ms, config)
        configs[str(tokens)] = {key: best[1][key] for key in CONFIG_KEYS}
        timings[str(tokens)] = round(best[0] * 1e3, 2)
        print(f"{family} G={slices} {DTYPE_NAMES[dtype]} T={tokens}: {timings[str(tokens)]} us with {best[1]}",
              flush=True)
    return configs, timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(PUBLISHED_SHAPES), choices=list(PUBLISHED_SHAPES))
    parser.add_argument("--slices", nargs="+", type=int, default=[1], help="MoEShard ranks G (each holds F/G)")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=list(DTYPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--full", action="store_true", help="the large search space (slow)")
    parser.add_argument("--out", type=Path, default=CONFIG_DIR)
    parser.add_argument("--dry-run", action="store_true", help="list the shapes and files; needs no GPU")
    args = parser.parse_args(argv)
    jobs = [(f, g, DTYPES[d]) for f in args.families for g in args.slices for d in args.dtype]
    if args.dry_run:
        for family, slices, dtype in jobs:
            experts, hidden, ffn, *_ = PUBLISHED_SHAPES[family]
            name = config_file_name("<device>", experts, -(-ffn // slices), hidden, dtype)
            print(f"{family} G={slices} {DTYPE_NAMES[dtype]} tokens={args.tokens} -> {name}")
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("tune_moe.py times kernels on a CUDA GPU and none is visible here; "
                         "--dry-run lists what it would tune")
    import triton

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    for family, slices, dtype in jobs:
        configs, timings = tune_one(family, slices, dtype, args.tokens, args.full, device)
        experts, hidden, ffn, *_ = PUBLISHED_SHAPES[family]
        width = -(-ffn // slices)
        path = args.out / config_file_name(name, experts, width, hidden, dtype)
        write_json(path, {"device": name, "capability": major * 10 + minor, "E": experts, "N": width,
                          "K": hidden, "dtype": DTYPE_NAMES[dtype], "triton": triton.__version__,
                          "torch": torch.__version__, "configs": configs, "time_us": timings}, sort_keys=True)
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

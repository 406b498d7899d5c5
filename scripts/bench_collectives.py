"""The collectives of CPU ranks on one host: gloo against the host channel (engine/parallel/host_channel.py), in
one run on the same ranks, at the sizes a served step exchanges (a MoE layer's packed rows, the control frames).

    torchrun --nproc-per-node 2 scripts/bench_collectives.py [--out benchmarks/results]

Each collective runs `--iterations` times after a warm-up; the table gives the mean time per call on rank 0
(every rank waits for the slowest, so all see about the same) and gloo's time over the channel's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.parallel.host_channel import host_channel  # noqa: E402
from engine.parallel.runtime import Dist  # noqa: E402
from foundation.atomic import write_json  # noqa: E402

# (what it stands for, rows per rank, bytes per row): a MoE layer's packed rows at decode and at a full step of
# the decode benchmark's model (32 hidden floats + 2 ids + 2 weights), and one control frame
SIZES = (("MoE rows, 16 per rank", 16, 160), ("MoE rows, 512 per rank", 512, 160), ("control frame", 1, 1 << 15))


def seconds_per_call(fn, iterations: int) -> float:
    for _ in range(max(iterations // 10, 5)):
        fn()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    channel = host_channel(None, timedelta(seconds=120))
    if channel is None:
        raise SystemExit("no host channel here (ranks on several hosts, or TESSERA_HOST_CHANNEL=0)")
    through_gloo = Dist(None, rank, world, "gloo", torch.device("cpu"))  # tessera's collectives without it
    rows = []
    for name, count, row_bytes in SIZES:
        x = torch.randint(0, 255, (count, row_bytes), dtype=torch.uint8)
        scatter = torch.randn(world * count, row_bytes // 4)
        cases = {"all-gather": (lambda: through_gloo.all_gather(x), lambda: channel.all_gather(x)),
                 "reduce-scatter": (lambda: through_gloo.reduce_scatter(scatter),
                                    lambda: channel.reduce_scatter(scatter))}
        for op, (gloo_call, channel_call) in cases.items():
            gloo_s = seconds_per_call(gloo_call, args.iterations)
            channel_s = seconds_per_call(channel_call, args.iterations)
            rows.append(dict(collective=op, size=name, bytes_per_rank=count * row_bytes, gloo_us=gloo_s * 1e6,
                             host_channel_us=channel_s * 1e6, gloo_over_channel=gloo_s / channel_s))
    if rank == 0:
        print(f"{world} CPU ranks, {args.iterations} calls each, mean per call on rank 0")
        print(f"{'collective':>15} {'size':>24} {'bytes':>7} | {'gloo us':>8} {'channel us':>10} | gloo/channel")
        for r in rows:
            print(f"{r['collective']:>15} {r['size']:>24} {r['bytes_per_rank']:>7} | {r['gloo_us']:>8.1f} "
                  f"{r['host_channel_us']:>10.1f} | {r['gloo_over_channel']:.1f}x")
        out = Path(args.out) / f"collectives_cpu_{world}ranks.json"
        write_json(out, dict(ranks=world, iterations=args.iterations, torch=torch.__version__,
                             started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=rows), indent=2)
        print(f"wrote {out}")
    channel.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One-process step microbenchmark (`scripts/bench_serve.py --workload step`): CPU milliseconds of one continuous
batching step with N decoding requests (`engine.serving.paged_batch.RankBatch`) against one decode step of
`model.generate` over the same N prompts (what the static batcher runs), on the decode benchmark's model
(tiny-mixtral's config, 1024 positions, seeded weights) with one thread.

    python scripts/bench_serve.py --workload step                 # 64 rows, both, a few seconds
    python scripts/bench_serve.py --workload step --rows 16,64 --profile 25
    python scripts/bench_serve.py --workload step --ranks 2       # the lockstep step of 2 gloo ranks (torchrun)
    python scripts/bench_serve.py --workload step --saturate 15   # the decode mix past capacity, tok/s, no HTTP

Prompts are 16-512 tokens (seeded). The continuous batch is filled first (every prompt prefilled, so every row
decodes), then `--steps` steps are timed. A generate decode step is the CPU time between two of its streamer's calls
(after the prefill), so it includes generate's own per-step work. Both are measured in the same run, alternately, as
CPU time of this process (`time.process_time`): on a shared machine compare the ratio, not the milliseconds.
`--profile K` prints cProfile's K most expensive functions (own time) of the continuous steps (rank 0's).

With `--ranks 2` the same rows run on each of 2 CPU ranks (torchrun, gloo, MoEShard, one thread each) through
rank 0's scheduler (`ContinuousEngine.step`) without HTTP: it reports the wall time of a lockstep step, rank 0's
CPU time in it, and each rank's time inside its step (forward plus waiting in the MoE collectives).

`--saturate SECONDS` steps the decode benchmark's request mix (prompts of 16-512 tokens, outputs of 8-256) with
twice `--rows` requests always waiting, on one process or (with `--ranks 2`) on 2 ranks, and reports output
tokens per second: the scheduler's capacity without the HTTP server and its clients. It writes
`serve_saturated_<ranks>rank_<device>.json`.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from engine.serving.config import ServeConfig  # noqa: E402

# per rank: the decode benchmark's KV blocks, and the server's step budget
BATCH = dict(num_blocks=1536, block_size=32, step_tokens=ServeConfig.step_tokens)


def prompts(rows: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 128) for _ in range(rng.randint(16, 512))] for _ in range(rows)]


def filled_batch(model, rows: list[list[int]], max_tokens: int):
    """A RankBatch with every row past its prefill (the decode benchmark's limits, `BATCH`)."""
    from engine.serving.paged_batch import RankBatch

    # no EOS: every row decodes for the whole measurement
    batch = RankBatch(model, **BATCH, max_requests=64, eos_token_id=[])
    for i, ids in enumerate(rows):
        batch.add(f"r{i}", ids, max_tokens=max_tokens)
    while any(state.generated_len() == 0 for state in batch.scheduler.active_requests.values()) \
            or batch.scheduler.waiting_requests:
        batch.step()
    return batch


def continuous_step_ms(batch, steps: int) -> float:
    start = time.process_time()
    for _ in range(steps):
        batch.step()
    return (time.process_time() - start) / steps * 1e3


def profiled(run, top: int):
    """`run()`, under cProfile when `top` > 0: then prints its `top` most expensive functions (own time)."""
    if not top:
        return run()
    profiler = cProfile.Profile()
    result = profiler.runcall(run)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())
    return result


def generate_step_ms(model, rows: list[list[int]], steps: int) -> float:
    """The static batcher's decode step: left-padded rows through `generate`; CPU time between the streamer's calls
    after the first token (so the prefill is not counted, and generate's own per-step work is)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1

    class Clock(BaseStreamer):
        stamps: list = []

        def put(self, value):
            self.stamps.append(time.process_time())

        def end(self):
            pass

    clock = Clock()
    batch_attention = model.config._attn_implementation  # an open RankBatch switched it: generate runs plain SDPA
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2 + steps, min_new_tokens=2 + steps,
                           do_sample=False, pad_token_id=0, streamer=clock)
    finally:
        model.set_attn_implementation(batch_attention)
    stamps = clock.stamps[2:]  # the prompt, then the first token (the prefill's)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def decode_mix(count: int, seed: int = 0):
    """(prompt ids, max_tokens) of the decode benchmark's mix: prompts of 16-512 tokens, outputs of 8-256."""
    rng = random.Random(seed)
    for _ in range(count):
        yield [rng.randrange(4, 128) for _ in range(rng.randint(16, 512))], rng.randint(8, 256)


def saturate(engine, seconds: float, backlog: int, label: str) -> dict:
    """Steps `engine` (a ContinuousEngine) for `seconds` with `backlog` requests of the decode mix always waiting
    (past capacity, as the decode benchmark's highest rate): output tokens per second, and the mean step."""
    from engine.serving.batcher import Request

    mix, live, made, steps = iter(decode_mix(100_000)), [], 0, 0
    start, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        while len(engine.incoming) + engine.queue.qsize() < backlog:
            ids, max_tokens = next(mix)
            request = Request("generate", ids, None, params=dict(max_tokens=max_tokens))
            engine.submit(request)
            live.append(request)
        engine._drain()
        engine.step()
        steps += 1
        made += sum(len(r.generated) for r in live)
        live = [r for r in live if r.result is None]
        made -= sum(len(r.generated) for r in live)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    made += sum(len(r.generated) for r in live)
    print(f"{label}: saturated {made / wall:7.1f} output tok/s over {wall:.1f} s, {steps} steps of "
          f"{wall / steps * 1e3:.2f} ms wall, {cpu / steps * 1e3:.2f} ms CPU (rank 0)", flush=True)
    return dict(output_tok_s=made / wall, seconds=wall, steps=steps, step_ms_wall=wall / steps * 1e3,
                step_ms_cpu_rank0=cpu / steps * 1e3)


def write_saturated(args, ranks: int, result: dict) -> None:
    """The saturated run's JSON: the scheduler's capacity without HTTP, beside the decode and HTTP benchmarks'."""
    from bench_serve_decode import device_slug
    from foundation.atomic import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve_saturated_{ranks}rank_{device_slug()}.json"
    write_json(path, dict(workload="step --saturate", ranks=ranks, rows_per_rank=args.rows[0],
                          step_tokens=BATCH["step_tokens"], kv_blocks_per_rank=BATCH["num_blocks"],
                          block_size=BATCH["block_size"], strategy="moeshard" if ranks > 1 else "single",
                          threads_per_process=1, **result), indent=2)
    print(f"wrote {path}")


def lockstep(args) -> int:
    """One rank of `--ranks 2` (under torchrun)."""
    import torch

    from engine.loader import load
    from engine.parallel import init_distributed
    from engine.serving.batcher import Request
    from engine.serving.coordinator import Coordinator, follow
    from engine.serving.paged_batch import RankBatch
    from engine.serving.runner import Runner
    from engine.serving.scheduler import ContinuousEngine

    info = init_distributed()
    model = load(args.folder, device="cpu", strategy="moeshard")
    runner = Runner(model, None, info.rank, info.size)
    runner.batch = RankBatch(model, **BATCH, max_requests=max(args.rows),
                             eos_token_id=[], dummy_when_idle=True)
    coordinator = Coordinator(runner, info.size)
    if info.rank != 0:
        follow(coordinator)
        return 0
    if args.saturate:
        engine = ContinuousEngine(coordinator, max_queue=10_000, max_running_per_rank=args.rows[0])
        engine.step()
        result = profiled(lambda: saturate(engine, args.saturate, backlog=2 * args.rows[0],
                                           label=f"{info.size} ranks, {args.rows[0]} per rank"), args.profile)
        coordinator.stop()
        write_saturated(args, info.size, result)
        return 0
    for n in args.rows:
        engine = ContinuousEngine(coordinator, max_queue=info.size * n + 1, max_running_per_rank=n)
        engine.step()
        requests = [Request("generate", ids, None, params=dict(max_tokens=args.repeats * args.steps + 8))
                    for ids in prompts(info.size * n)]
        for request in requests:
            engine.submit(request)
        engine._drain()
        while any(request.first_token_at is None for request in requests):
            engine.step()
        seen, execute = [], coordinator.execute

        def recorded(op, *rest):
            results = execute(op, *rest)
            seen.append([result["seconds"] for result in results])
            return results

        coordinator.execute = recorded
        for _ in range(args.repeats):
            seen.clear()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                engine.step()
            wall, cpu = (time.perf_counter() - wall) / args.steps * 1e3, (time.process_time() - cpu) / args.steps * 1e3
            inside = [sum(s[r] for s in seen) / len(seen) * 1e3 for r in range(info.size)]
            print(f"{n:>4} rows per rank: lockstep step {wall:6.2f} ms wall ({info.size * n / wall * 1e3:7.1f} "
                  f"tok/s), rank 0 CPU {cpu:6.2f} ms, inside the step per rank "
                  f"{', '.join(f'{x:.2f}' for x in inside)} ms", flush=True)
        coordinator.execute = execute
        while engine.active:  # let them finish before the next size
            engine.step()
    coordinator.stop()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[64])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="alternate the two measurements this many times")
    parser.add_argument("--profile", type=int, default=0, help="print the top K functions of the continuous steps")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--saturate", type=float, default=0, metavar="SECONDS",
                        help="instead: step the decode benchmark's mix past capacity for SECONDS, report tok/s")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results",
                        help="where --saturate writes its JSON")
    parser.add_argument("--folder", help=argparse.SUPPRESS)  # the model, built by the launching process
    args = parser.parse_args(argv)
    os.environ.setdefault("TESSERA_CACHE", tempfile.mkdtemp(prefix="tessera-bench-"))
    import torch

    import engine
    from bench_serve_decode import build_model, free_port

    torch.set_num_threads(1)
    if "RANK" in os.environ:
        return lockstep(args)
    folder = Path(tempfile.mkdtemp(prefix="tessera-bench-model-"))
    build_model(folder)
    if args.ranks > 1:
        import subprocess

        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
                   f"--master-port={free_port()}", __file__, "--folder", str(folder), "--steps", str(args.steps),
                   "--repeats", str(args.repeats), "--rows", ",".join(map(str, args.rows)),
                   "--saturate", str(args.saturate), "--profile", str(args.profile),
                   "--out", str(Path(args.out).resolve())]
        return subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    model = engine.load(str(folder), device="cpu")
    if args.saturate:
        from engine.serving.coordinator import Coordinator
        from engine.serving.paged_batch import RankBatch
        from engine.serving.scheduler import ContinuousEngine, _LocalRunner

        batch = RankBatch(model, **BATCH, max_requests=args.rows[0])
        scheduler = ContinuousEngine(Coordinator(_LocalRunner(batch)), max_queue=10_000,
                                     max_running_per_rank=args.rows[0])
        scheduler.step()
        result = profiled(lambda: saturate(scheduler, args.saturate, backlog=2 * args.rows[0],
                                           label=f"1 process, {args.rows[0]} rows"), args.profile)
        batch.close()
        write_saturated(args, 1, result)
        return 0
    for n in args.rows:
        rows = prompts(n)
        batch = filled_batch(model, rows, max_tokens=args.repeats * args.steps + 8)
        cont, gen = [], []
        for _ in range(args.repeats):
            cont.append(continuous_step_ms(batch, args.steps))
            if not args.skip_generate:
                gen.append(generate_step_ms(model, rows, args.steps))
        batch.close()
        c = min(cont)
        line = f"{n:>4} rows: continuous step {c:6.2f} ms CPU"
        if gen:
            g = min(gen)
            line += f", generate decode step {g:6.2f} ms CPU, ratio {c / g:.2f}"
        print(line + f"  (min of {args.repeats}; all: {[round(x, 2) for x in cont]} / {[round(x, 2) for x in gen]})",
              flush=True)
        if args.profile:
            extra = filled_batch(model, rows, max_tokens=args.steps + 8)
            profiled(lambda: continuous_step_ms(extra, args.steps), args.profile)
            extra.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

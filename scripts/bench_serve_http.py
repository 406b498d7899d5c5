"""HTTP-layer benchmark (`scripts/bench_serve.py --workload http`): what rank 0's HTTP server and scheduler cost
per streamed token when the model costs nothing.

The decode benchmark's requests (scripts/bench_serve_decode.py: Poisson arrivals, prompts of 16-512 tokens, outputs
of 8-256, every request greedy and streaming, the same aiohttp client) go to the server's own app and continuous
scheduler (`engine.serving.app.create_app`, `engine.serving.scheduler.ContinuousEngine`, uvicorn) in a process of
their own, over a model-free coordinator: each step sleeps `--step-ms` (releasing the GIL, as a forward's torch
calls do) and then gives every running request one token. Everything else is the server's: admission, prompt
encoding, placement over 2 ranks' KV blocks, stop-string checks, metrics, detokenisation and server-sent events.

Per arrival rate it reports the throughput and the CPU milliseconds per streamed token of the server process (from
/proc) and of the client. On the decode benchmark this work shares rank 0's process, and its GIL, with rank 0's
forward passes, which the other ranks wait for in their collectives: this measures how much of the machine it needs
on its own.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_serve_decode import (build_model, device_slug, free_port, run_client, run_level, stop,  # noqa: E402
                                tree_cpu_seconds, wait_healthy)
from bench_serve_step import BATCH  # noqa: E402
from foundation.atomic import write_json  # noqa: E402

BLOCK_SIZE, BLOCKS_PER_RANK, WORLD = BATCH["block_size"], BATCH["num_blocks"], 2


class ModelFreeCoordinator:
    """Two ranks' steps without a model: after `step_s` of sleep, one token (a printable character's id) per
    running request, which ends at its max_tokens."""

    world = WORLD

    def __init__(self, step_s: float):
        self.step_s, self.rng = step_s, random.Random(0)
        self.runner = type("NoModel", (), {"model": None, "batch": None})()
        self.rows = [{} for _ in range(WORLD)]  # per rank: request id -> [tokens left, KV blocks held]

    def execute(self, op: dict) -> list[dict]:
        if op["type"] != "step":
            return [{"seconds": 0.0} for _ in range(WORLD)]
        time.sleep(self.step_s)
        return [self._rank_step(rows, op["add"][r], op["cancel"][r]) for r, rows in enumerate(self.rows)]

    def _rank_step(self, rows: dict, add: list[dict], cancel: list[str]) -> dict:
        for request in add:
            rows[request["request_id"]] = [request["max_tokens"],
                                           -(-(len(request["token_ids"]) + request["max_tokens"]) // BLOCK_SIZE)]
        for request_id in cancel:
            rows.pop(request_id, None)
        events = []
        for request_id, row in list(rows.items()):
            row[0] -= 1
            finish = "length" if row[0] <= 0 else None
            if finish:
                del rows[request_id]
            events.append(dict(id=request_id, tokens=[self.rng.randint(4, 98)], logprobs=None, finish=finish,
                               error=None))
        used = sum(blocks for _, blocks in rows.values())
        kv = dict(blocks_total=BLOCKS_PER_RANK, blocks_used=used, blocks_free=BLOCKS_PER_RANK - used,
                  block_size=BLOCK_SIZE, running=len(rows), waiting=0, preemptions=0)
        return dict(events=events, seconds=self.step_s, kv=kv)

    def stop(self) -> None:
        pass


def serve(folder: Path, port: int, step_s: float, max_running: int) -> None:
    """The server process: the app and scheduler of scripts/serve_moe.py over the model-free coordinator."""
    import uvicorn

    from engine.serving.app import create_app
    from engine.serving.config import ServeConfig
    from engine.serving.metrics import Metrics
    from engine.serving.scheduler import ContinuousEngine
    from engine.serving.tokenizer import load_tokenizer

    config = ServeConfig(model=str(folder), max_queue=512, max_batch_size=max_running, max_input_tokens=600)
    tokenizer, metrics = load_tokenizer(folder, 0), Metrics()
    engine = ContinuousEngine(ModelFreeCoordinator(step_s), metrics, tokenizer, max_queue=config.max_queue,
                              max_running_per_rank=max_running)
    engine.start()
    app = create_app(engine, config, tokenizer, str(folder), "decoder", metrics, context_length=1024)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[16, 64, 128])
    parser.add_argument("--seconds", type=float, default=15, help="arrivals per level")
    parser.add_argument("--grace", type=float, default=10)
    parser.add_argument("--step-ms", type=float, default=25.0,
                        help="the model-free step's time (the decode model's saturated 2-rank step: about 25 ms)")
    parser.add_argument("--max-running", type=int, default=128, help="running requests per rank")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)  # the server process: FOLDER PORT
    args = parser.parse_args(argv)
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]), args.step_ms / 1000, args.max_running)
        return 0
    folder = Path(tempfile.mkdtemp(prefix="tessera-bench-model-"))
    build_model(folder)  # its tokenizer: the decode benchmark's, one character per id
    port = free_port()
    command = [sys.executable, __file__, "--serve", str(folder), str(port), "--step-ms", str(args.step_ms),
               "--max-running", str(args.max_running)]
    log = Path(tempfile.gettempdir()) / "tessera-bench-http.log"
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url, levels = f"http://127.0.0.1:{port}", []
    try:
        wait_healthy(process, url)
        run_client(run_level(url, str(folder), 1.0, 2.0, 10, seed=99))  # warm up
        for i, rate in enumerate(args.rates):
            server_before, client_before = tree_cpu_seconds(process.pid), time.process_time()
            level = run_client(run_level(url, str(folder), rate, args.seconds, args.grace, seed=i))
            tokens = max(level["output_tokens"], 1)
            level["server_cpu_ms_per_token"] = 1000 * (tree_cpu_seconds(process.pid) - server_before) / tokens
            level["client_cpu_ms_per_token"] = 1000 * (time.process_time() - client_before) / tokens
            levels.append(level)
            time.sleep(3)  # the cut-off requests leave
    finally:
        stop(process)
    print(f"\nHTTP server and scheduler over a model-free step of {args.step_ms:g} ms, 2 ranks' KV blocks")
    print(f"{'rate/s':>7} | {'tok/s':>8} | {'TTFT p50':>8} | {'done':>9} | {'errors':>6} | "
          f"{'server CPU ms/token':>19} | {'client CPU ms/token':>19}")
    for level in levels:
        ttft = "-" if level["ttft_p50_s"] is None else f"{level['ttft_p50_s']:.3f}"
        print(f"{level['rate_per_s']:>7g} | {level['throughput_tok_s']:>8.1f} | {ttft:>8} | "
              f"{level['completed']:>4}/{level['requests']:<4} | {level['errors']:>6} | "
              f"{level['server_cpu_ms_per_token']:>19.3f} | {level['client_cpu_ms_per_token']:>19.3f}")
    out, device = Path(args.out), device_slug()
    out.mkdir(parents=True, exist_ok=True)
    name = f"serve_http_{device}.json"
    write_json(out / name, dict(workload="http", step_ms=args.step_ms, max_running_per_rank=args.max_running,
                                ranks=WORLD, kv_blocks_per_rank=BLOCKS_PER_RANK, block_size=BLOCK_SIZE,
                                seconds_of_arrivals=args.seconds, device=device, levels=levels), indent=2)
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

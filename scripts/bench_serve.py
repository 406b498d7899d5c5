"""Load test of scripts/serve_moe.py over loopback: throughput, p50/p99 latency and errors as the number of
concurrent clients rises past the server's capacity. Past capacity a healthy server answers 503 (with
Retry-After) from its bounded queue, never times out or crashes.

    python scripts/bench_serve.py                    # starts a 2-rank CPU server itself, ~2 minutes
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --concurrency 1,8,64 --seconds 10
    python scripts/bench_serve.py --workload decode  # generation: three schedulers side by side, a few minutes
    python scripts/bench_serve.py --workload step    # CPU ms of one continuous step vs one generate step
    python scripts/bench_serve.py --workload http    # the HTTP server's CPU per streamed token, model-free

Every client loop is bounded in requests and time, and all traffic goes to 127.0.0.1 (or the --url you give).
The decode workload is in scripts/bench_serve_decode.py, the step microbenchmark in scripts/bench_serve_step.py,
the HTTP one in scripts/bench_serve_http.py.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from foundation.atomic import write_json  # noqa: E402

TEXT = "Mixture-of-experts layers route every token to a few experts; tessera shards each expert over all ranks."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
               f"--master-port={free_port()}", str(ROOT / "scripts" / "serve_moe.py"), "--port", str(port),
               "--model", args.model, "--strategy", args.strategy, "--max-queue", str(args.max_queue)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    raise RuntimeError("server did not start in 300 s")


async def client_loop(client: httpx.AsyncClient, endpoint: str, payload: dict, until: float, max_requests: int,
                      samples: list):
    for _ in range(max_requests):
        if time.perf_counter() >= until:
            return
        start = time.perf_counter()
        try:
            response = await client.post(endpoint, json=payload)
            samples.append((response.status_code, time.perf_counter() - start))
            if response.status_code == 503:
                await asyncio.sleep(float(response.headers.get("retry-after", "1")) / 10)
        except httpx.TimeoutException:
            samples.append(("timeout", time.perf_counter() - start))
        except httpx.TransportError:
            samples.append(("transport", time.perf_counter() - start))


async def run_level(url: str, endpoint: str, payload: dict, concurrency: int, seconds: float) -> dict:
    samples: list = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        start = time.perf_counter()
        until = start + seconds
        await asyncio.gather(*(client_loop(client, endpoint, payload, until, 10_000, samples)
                               for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ok = sorted(latency for status, latency in samples if status == 200)

    def pct(p):
        return ok[min(int(p * len(ok)), len(ok) - 1)] * 1e3 if ok else None

    return dict(concurrency=concurrency, requests=len(samples), ok=len(ok), throughput_rps=len(ok) / elapsed,
                p50_ms=pct(0.50), p99_ms=pct(0.99),
                status_503=sum(1 for s, _ in samples if s == 503),
                timeouts=sum(1 for s, _ in samples if s == "timeout"),
                other_errors=sum(1 for s, _ in samples if s not in (200, 503, "timeout")))


def plot(levels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [level["concurrency"] for level in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(c, [level["throughput_rps"] for level in levels], "o-", label="answered (200) per second")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="answered requests / s", title="throughput")
    share = left.twinx()
    share.plot(c, [100 * level["status_503"] / max(level["requests"], 1) for level in levels], "x--", color="tab:red",
               label="503 (% of requests)")
    share.set_ylabel("503 answers (% of requests)")
    share.set_ylim(0, 100)
    fig.legend(loc="upper left", bbox_to_anchor=(0.08, 0.88))
    answered = [level for level in levels if level["ok"]]
    right.plot([level["concurrency"] for level in answered], [level["p50_ms"] for level in answered], "o-", label="p50")
    right.plot([level["concurrency"] for level in answered], [level["p99_ms"] for level in answered], "s-", label="p99")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency of 200s (ms)",
              title="latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    workload = argparse.ArgumentParser(add_help=False)
    workload.add_argument("--workload", choices=["embed", "decode", "step", "http"], default="embed")
    chosen, rest = workload.parse_known_args(argv)
    if chosen.workload != "embed":  # each in a script of its own
        sys.path.insert(0, str(ROOT / "scripts"))
        return importlib.import_module(f"bench_serve_{chosen.workload}").main(rest)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[workload])
    parser.add_argument("--url", help="a running server; default: start one")
    parser.add_argument("--model", default="minilm-moe")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64, 128])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = parser.parse_args(argv)
    process = None
    url = args.url
    if url is None:
        process, url = start_server(args)
    try:
        info = httpx.get(url + "/health").json()
        if info["kind"] == "encoder":
            endpoint, payload = "/v1/embeddings", {"input": TEXT}
        else:
            endpoint, payload = "/v1/completions", {"prompt": TEXT, "max_tokens": 8, "temperature": 0}
        print(f"{'clients':>7} {'requests':>8} {'200/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'503':>6} "
              f"{'timeouts':>8} {'errors':>6}")
        levels = []
        for concurrency in args.concurrency:
            level = asyncio.run(run_level(url, endpoint, payload, concurrency, args.seconds))
            levels.append(level)
            fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            print(f"{concurrency:>7} {level['requests']:>8} {level['throughput_rps']:>8.1f} {fmt(level['p50_ms']):>8} "
                  f"{fmt(level['p99_ms']):>8} {level['status_503']:>6} {level['timeouts']:>8} "
                  f"{level['other_errors']:>6}")
        healthy_after = httpx.get(url + "/health").status_code == 200
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(server=info, endpoint=endpoint, seconds_per_level=args.seconds, max_queue=args.max_queue,
                  strategy=args.strategy, levels=levels, healthy_after=healthy_after)
    write_json(out / "serve_cpu.json", result, indent=2)
    plot(levels, out / "serve_cpu.png")
    print(f"healthy after the load: {healthy_after}; wrote {out / 'serve_cpu.json'} and {out / 'serve_cpu.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode serving benchmark (`scripts/bench_serve.py --workload decode`): Poisson arrivals of completions with mixed
prompt lengths (16-512 tokens) and output lengths (8-256 tokens), at rising arrival rates, against three servers
in turn on the same tiny decoder MoE:

- tessera with the continuous scheduler on 2 CPU ranks (torchrun, gloo, MoEShard),
- tessera with the static batcher (`--scheduler static`) on the same 2 ranks,
- `transformers serve --continuous-batching` on one process.

Per arrival rate: output tokens per second (every token streamed before the level's end), time to first token
(TTFT) p50/p99, time per output token (TPOT, per finished request: first token to last over the tokens after the
first) p50/p99, errors (non-200 answers, such as a full queue's 503, and broken streams; counted by kind) and
requests unfinished when the level's time is up. It also gives the CPU time per output token of the server's
processes (from /proc) and of this client, which shares the machine: where the cores are the limit, throughput
follows these. The highest rate is past every server's capacity (saturation). A server's capacity is its highest
throughput over the levels, and the printed ratios compare capacities. Every request is greedy and streams. The
model is Mixtral-shaped with random seeded weights (tiny-mixtral's config, 1024 positions) and a character
tokenizer that both servers load from the same folder, so every server computes the same tokens. A token is
counted per streamed character (the tokenizer maps each non-special id to one character).

The client streams with aiohttp, as vLLM's benchmark_serving does: it takes about a third of httpx's CPU per streamed
token (0.04 against 0.13 ms, measured at 64/s), CPU the servers otherwise lose on these shared cores. `--repeats N`
runs every level N times with the same arrivals and reports the run of median throughput (with all N): on this
machine one run's throughput at saturation varies by 15-30% from run to run. The servers take turns: each repeat
starts every server in turn and runs all its levels, so a drift of the machine's speed hits every server alike.
All traffic is on 127.0.0.1; every level is bounded in time.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.metadata
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

try:
    import aiohttp
except ImportError:  # pragma: no cover - a message, not a traceback
    raise SystemExit("bench_serve --workload decode needs aiohttp: pip install -e '.[bench]'") from None

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from foundation.atomic import write_json  # noqa: E402

VERSIONED = ("torch", "transformers", "triton", "uvicorn", "aiohttp")  # recorded with the results


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(folder: Path) -> None:
    """tiny-mixtral's config with room for 512 + 256 tokens, seeded weights, and a tokenizer of one character per
    id (ids 0-3 are special), saved as a Hugging Face folder."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    import engine

    config = engine.load("tiny-mixtral", device="cpu").config
    config.max_position_embeddings = 1024
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    specials = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    chars = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(0xC0, 0xC0 + config.vocab_size)]
    vocab = dict(specials)
    for i, ch in zip(range(4, config.vocab_size), [c for c in chars if c not in specials]):
        vocab[ch] = i
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


def wait_healthy(process: subprocess.Popen, url: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} did not start in {seconds} s")


def start(kind: str, folder: Path, args, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if kind == "transformers":
        # One thread, like each tessera rank (torchrun sets OMP_NUM_THREADS=1): the comparison is per process,
        # and on a shared CPU a multi-threaded process is slowed down many times over by oversubscription.
        env["OMP_NUM_THREADS"] = "1"
        command = [str(Path(sys.executable).with_name("transformers")), "serve", "--continuous-batching",
                   "--device", "cpu", "--port", str(port), "--cb-block-size", "32", "--cb-num-blocks",
                   str(args.kv_blocks), "--cb-max-batch-tokens", str(args.step_tokens), str(folder)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
                   f"--master-port={free_port()}", str(ROOT / "scripts" / "serve_moe.py"), "--port", str(port),
                   "--model", str(folder), "--strategy", "moeshard", "--scheduler", kind, "--max-queue", "512",
                   # 64 sequences per batch (static) or --max-running per rank (continuous); prompt tokens do not
                   # cap a static batch below that (the default 8192 would stop it at about 31 of these prompts)
                   "--max-batch-size", str(args.max_running if kind == "continuous" else 64),
                   "--max-batch-tokens", str(64 * 512),
                   "--max-input-tokens", "600", "--kv-block-size", "32", "--step-tokens", str(args.step_tokens),
                   "--kv-cache-bytes", str(args.kv_blocks * kv_block_bytes(folder))]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url)
    except RuntimeError:
        stop(process)
        raise
    return process, url


def kv_block_bytes(folder: Path) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(folder)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 32 * 4


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the servers drain), then wait until every process of the server's tree is gone, so the next server
    starts on an idle machine: torchrun starts its ranks in sessions of their own, which outlive its process group."""
    tree = set(tree_stats(process.pid))
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    deadline = time.time() + 30
    while tree & set(tree_stats(None)) and time.time() < deadline:
        time.sleep(0.2)
    for pid in tree & set(tree_stats(None)):  # still there after 30 s
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def tree_stats(root: int | None) -> dict[int, float]:
    """pid -> CPU seconds (user + system) so far of the live processes of the tree under `root` (the server:
    torchrun and its ranks, or transformers serve), from /proc; with `root` None, of every live process (whose
    state is not zombie)."""
    tick, stats = os.sysconf("SC_CLK_TCK"), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # the fields after the name: state, ppid, ..., utime (12th), stime (13th)
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z":
            stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    if root is None:
        return {pid: cpu for pid, (_, cpu) in stats.items()}
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
        tree, grew = tree | more, bool(more)
    return {pid: stats[pid][1] for pid in tree if pid in stats}


def tree_cpu_seconds(root: int) -> float:
    return sum(tree_stats(root).values())


def workload(rate: float, seconds: float, seed: int) -> list[tuple[float, str, int]]:
    """(arrival offset in s, prompt, max_tokens): Poisson arrivals at `rate`/s for `seconds`."""
    rng = random.Random(seed)
    words = "mixture experts route every token to a few of them and the rest stay idle".split()
    out, t = [], rng.expovariate(rate)
    while t < seconds:
        length = rng.randint(16, 512)
        text = ""
        while len(text) < length:
            text += rng.choice(words) + " "
        out.append((t, text[:length], rng.randint(8, 256)))
        t += rng.expovariate(rate)
    return out


async def one(session, model: str, prompt: str, max_tokens: int, start: float, offset: float, results: list):
    await asyncio.sleep(max(start + offset - time.perf_counter(), 0))
    record = {"sent": time.perf_counter(), "stamps": [], "error": None, "done": False}
    results.append(record)  # before the answer: a request cut off at the level's end still counts its tokens
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        async with session.post("/v1/completions", json=payload) as response:
            if response.status != 200:
                record["error"] = f"HTTP {response.status}"
            else:
                rest = b""
                async for data in response.content.iter_any():
                    now = time.perf_counter()
                    *events, rest = (rest + data).split(b"\n\n")
                    for event in events:
                        if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
                            continue
                        chunk = json.loads(event[6:])
                        if "error" in chunk:
                            record["error"] = "stream error"
                            break
                        text = chunk["choices"][0].get("text") or ""
                        record["stamps"] += [now] * len(text)
                    if record["error"]:
                        break
                record["done"] = record["error"] is None
    except (asyncio.TimeoutError, aiohttp.ClientError) as err:
        record["error"] = type(err).__name__


def run_client(coroutine):
    """Runs the load generator on uvloop where it is installed (the server's dependency too): the client shares the
    cores with the servers it measures, and every streamed token costs it an event-loop wake-up."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def pct(values: list[float], p: float) -> float | None:
    """The p-quantile; None when there is none or it is infinite (requests that never got a token)."""
    if not values:
        return None
    value = sorted(values)[min(int(p * len(values)), len(values) - 1)]
    return None if value == float("inf") else value


async def run_level(url: str, model: str, rate: float, seconds: float, grace: float, seed: int) -> dict:
    """One arrival rate. Throughput counts every token streamed before the level's end, also those of requests
    still running then, so past capacity it is what the server delivers, not what it managed to finish. TTFT
    percentiles count a request that got no token by then as infinitely late (reported as None, with the count)."""
    requests = workload(rate, seconds, seed)
    results: list = []
    async with aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=1024),
                                     timeout=aiohttp.ClientTimeout(total=seconds + grace)) as session:
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(session, model, p, n, start, t, results)) for t, p, n in requests]
        done, pending = await asyncio.wait(tasks, timeout=seconds + grace)
        end = time.perf_counter()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    elapsed = end - start
    completed = [r for r in results if r["done"]]
    served = [r for r in results if r["error"] is None]  # finished, or still streaming at the end
    ttft = [r["stamps"][0] - r["sent"] if r["stamps"] else float("inf") for r in served]
    ttft += [float("inf")] * (len(requests) - len(results))  # not even sent before the end
    tpot = [(r["stamps"][-1] - r["stamps"][0]) / (len(r["stamps"]) - 1) for r in completed if len(r["stamps"]) > 1]
    tokens = sum(sum(stamp <= end for stamp in r["stamps"]) for r in served)
    return dict(rate_per_s=rate, requests=len(requests), completed=len(completed), unfinished=len(pending),
                errors=sum(1 for r in results if r["error"] is not None),
                error_kinds=dict(collections.Counter(r["error"] for r in results if r["error"] is not None)),
                output_tokens=tokens,
                seconds=round(elapsed, 2), throughput_tok_s=tokens / elapsed,
                ttft_p50_s=pct(ttft, 0.5), ttft_p99_s=pct(ttft, 0.99),
                no_first_token=sum(t == float("inf") for t in ttft),
                tpot_p50_s=pct(tpot, 0.5), tpot_p99_s=pct(tpot, 0.99))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=15, help="arrivals per level")
    parser.add_argument("--grace", type=float, default=30, help="after the arrivals, time left to finish")
    parser.add_argument("--schedulers", default="continuous,static,transformers")
    parser.add_argument("--ranks", type=int, default=2)
    # 1536 blocks of 32 tokens: what the static batcher's cache holds for a full batch (64 rows of 512 + 256)
    parser.add_argument("--kv-blocks", type=int, default=1536, help="KV blocks of 32 tokens per rank / process")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per rate on each server; the table reports the run of median throughput")
    parser.add_argument("--step-tokens", type=int, default=512,
                        help="tokens per step (prefill chunks and decodes) of both continuous schedulers "
                             "(the server's default)")
    parser.add_argument("--max-running", type=int, default=128,
                        help="continuous scheduler: requests per rank (paged: in the same KV blocks as the static "
                             "batcher's 64)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    parser.add_argument("--replot", metavar="JSON", help="only draw the plot of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        plot(json.loads(path.read_text())["schedulers"], path.with_suffix(".png"))
        return 0
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    os.environ.setdefault("TESSERA_CACHE", tempfile.mkdtemp(prefix="tessera-bench-"))
    folder = Path(tempfile.mkdtemp(prefix="tessera-bench-model-"))
    build_model(folder)
    kinds, model = args.schedulers.split(","), str(folder)
    runs = {kind: [[] for _ in args.rates] for kind in kinds}
    for repeat in range(args.repeats):  # every server once per repeat, in turn: the machine's drift hits all alike
        for kind in kinds:
            log = Path(tempfile.gettempdir()) / f"tessera-bench-{kind}.log"
            process, url = start(kind, folder, args, log)
            try:
                run_client(run_level(url, model, 1.0, 2.0, 30, seed=99))  # warm up
                for i, rate in enumerate(args.rates):  # the same arrivals in every repeat
                    level = measured_level(process, url, model, rate, args, seed=i)
                    runs[kind][i].append(level)
                    print(f"run {repeat + 1}/{args.repeats}: {describe(kind, rate, level)}", flush=True)
                    time.sleep(5)  # the cut-off requests leave their batches
            finally:
                stop(process)
    table = {}
    for kind in kinds:
        table[kind] = []
        for levels in runs[kind]:
            levels.sort(key=lambda lv: lv["throughput_tok_s"])
            table[kind].append(dict(levels[len(levels) // 2],
                                    repeats_tok_s=[round(lv["throughput_tok_s"], 1) for lv in levels]))
    if args.repeats > 1:
        print("\nthe run of median throughput per level (all runs' throughput in brackets):")
        for kind in kinds:
            for rate, level in zip(args.rates, table[kind]):
                print(f"{describe(kind, rate, level)} {level['repeats_tok_s']}")
    print_table(table, args.rates)
    ratios = saturation_ratios(table)
    for name, ratio in ratios.items():
        print(f"capacity: {name} = {ratio:.2f}")
    out, device = Path(args.out), device_slug()
    out.mkdir(parents=True, exist_ok=True)
    result = dict(workload="decode", model="tiny-mixtral config, 1024 positions, seeded weights, char tokenizer",
                  prompt_tokens=[16, 512], output_tokens=[8, 256], seconds_of_arrivals=args.seconds,
                  grace_s=args.grace, repeats=args.repeats, ranks=args.ranks, step_tokens=args.step_tokens,
                  max_running_per_rank=args.max_running,
                  kv_blocks=args.kv_blocks, block_size=32,
                  threads="OMP_NUM_THREADS=1 per process (tessera: per rank, set by torchrun)",
                  device=device, versions={name: installed_version(name) for name in VERSIONED},
                  started=started, schedulers=table, saturation_throughput_ratios=ratios)
    name = f"serve_decode_{device}.json"
    write_json(out / name, result, indent=2)
    plot(table, out / name.replace(".json", ".png"))
    print(f"wrote {out / name} and its plot")
    return 0


def plot(table: dict, path: Path) -> None:
    """Throughput (with the spread of the repeats) and TTFT p50/p99 against the arrival rate, per server; a TTFT
    percentile that some request never reached (it got no token before the level's end) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rates = sorted({level["rate_per_s"] for levels in table.values() for level in levels})
    for (kind, levels), color in zip(table.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        tok = [level["throughput_tok_s"] for level in levels]
        runs = [level.get("repeats_tok_s", [t]) for t, level in zip(tok, levels)]  # rounded: clamp at the median
        spread = [[max(t - min(r), 0) for t, r in zip(tok, runs)], [max(max(r) - t, 0) for t, r in zip(tok, runs)]]
        left.errorbar([level["rate_per_s"] for level in levels], tok, yerr=spread, marker="o", capsize=3,
                      color=color, label=kind)
        for key, style in (("ttft_p50_s", "o-"), ("ttft_p99_s", "s--")):
            points = [(level["rate_per_s"], level[key]) for level in levels if level[key] is not None]
            if points:
                right.plot(*zip(*points), style, color=color, label=f"{kind} {key[5:8]}")
    left.set(xscale="log", xlabel="arrivals / s", ylabel="output tokens / s", title="throughput (bars: all runs)")
    right.set(xscale="log", yscale="log", xlabel="arrivals / s", ylabel="time to first token (s)",
              title="TTFT (a missing point: some request never got a token)")
    for axis in (left, right):
        axis.set_xticks(rates, [f"{r:g}" for r in rates])
        axis.minorticks_off()
    left.legend()
    right.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def device_slug() -> str:
    """What the servers ran on (serve_moe.py takes the GPU where there is one): "cpu", or the GPU's name."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name(0)).strip("_").lower()


def measured_level(process, url: str, model: str, rate: float, args, seed: int) -> dict:
    """One run of one arrival rate, with the CPU per output token of the server's processes and of this client."""
    cpu, client_cpu, preempted = tree_cpu_seconds(process.pid), time.process_time(), preemptions(url)
    level = run_client(run_level(url, model, rate, args.seconds, args.grace, seed=seed))
    tokens = max(level["output_tokens"], 1)
    level["server_cpu_ms_per_token"] = 1000 * (tree_cpu_seconds(process.pid) - cpu) / tokens
    level["client_cpu_ms_per_token"] = 1000 * (time.process_time() - client_cpu) / tokens
    after = preemptions(url)
    level["preemptions"] = None if after is None else after - preempted
    return level


def preemptions(url: str) -> float | None:
    """tessera's count of requests preempted when a rank's KV cache was full (None: a server without it)."""
    try:
        text = httpx.get(url + "/metrics", timeout=30).text
    except httpx.HTTPError:
        return None
    return next((float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("tessera_preemptions_total ")), None)


def saturation_ratios(table: dict) -> dict:
    """The continuous scheduler's capacity over each other server's: a server's capacity is its highest throughput
    over the levels, so a server whose throughput falls past capacity (refusing and queueing cost it CPU) is
    compared at its best (transformers serve runs one process, tessera two ranks: its ratio is also given per
    process)."""
    if "continuous" not in table:
        return {}
    capacity = {kind: max(level["throughput_tok_s"] for level in levels) for kind, levels in table.items()}
    ratios = {f"continuous/{kind}": capacity["continuous"] / value
              for kind, value in capacity.items() if kind != "continuous" and value > 0}
    if "continuous/transformers" in ratios:
        ratios["continuous per rank/transformers"] = ratios["continuous/transformers"] / 2
    return ratios


def describe(kind: str, rate: float, level: dict) -> str:
    return (f"{kind:>12} rate {rate:>4}/s: {level['throughput_tok_s']:7.1f} tok/s, "
            f"TTFT p50/p99 {fmt(level['ttft_p50_s'])}/{fmt(level['ttft_p99_s'])} s, "
            f"TPOT p50/p99 {fmt(level['tpot_p50_s'], 3)}/{fmt(level['tpot_p99_s'], 3)} s, "
            f"{level['completed']}/{level['requests']} done, {level['unfinished']} unfinished, "
            f"{level['errors']} errors, CPU per token: server {level['server_cpu_ms_per_token']:.3f} ms, "
            f"client {level['client_cpu_ms_per_token']:.3f} ms")


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(table: dict, rates: list[float]) -> None:
    kinds = list(table)
    print(f"\n{'rate/s':>6} | " + " | ".join(f"{k:^34}" for k in kinds))
    print(f"{'':>6} | " + " | ".join(f"{'tok/s':>6} {'TTFT p50/p99':>13} {'TPOT p50/p99':>13}" for _ in kinds)
          + " | errors, unfinished")
    for i, rate in enumerate(rates):
        cells, errors = [], []
        for k in kinds:
            lv = table[k][i]
            ttft = [fmt(lv[key]) if lv[key] is not None else "never" for key in ("ttft_p50_s", "ttft_p99_s")]
            cells.append(f"{lv['throughput_tok_s']:>6.1f} {ttft[0]:>6}/{ttft[1]:<6} "
                         f"{fmt(lv['tpot_p50_s'], 3):>6}/{fmt(lv['tpot_p99_s'], 3):<6}")
            errors.append(f"{lv['errors']},{lv['unfinished']}")
        print(f"{rate:>6} | " + " | ".join(cells) + " | " + "/".join(errors))


if __name__ == "__main__":
    sys.exit(main())

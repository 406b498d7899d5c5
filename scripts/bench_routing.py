"""Benchmark LoRA routing: accuracy in three regimes, routing latency with 1500 tasks, and mixture kernel speed.

Routing uses the multi-task text benchmark in configs/lora/bench_tasks.yaml (built from templates, nothing is
downloaded) and the real all-MiniLM-L6-v2 encoder. Regimes, for each test query of task t in family f and
domain d:
  in-distribution  every task has its adapter;                   correct = t
  semi-OOD         t's adapter is removed (t leaves the router);  correct = t's sibling task in f
  OOD              t's whole family is unseen;                    no task is correct: only the fallback rate
                                                                  and the confidence are reported
acc@1 / acc@3: a correct task is the top-1 / among the top-3. No adapter is trained here, so answers are not
scored: scripts/bench_lora_e2e.py measures exact-match accuracy as a % of the oracle adapter's.

Kernel speed: one adapted linear layer (base W x plus LoRA) with a different adapter mix per row:
  base          W x alone
  one_lora      W x + one adapter per row (our kernel, K = 1)
  mix3          W x + three weighted adapters per row (our kernel, K = 3)
  peft_one      PEFT's mixed-batch path, one adapter per row (`adapter_names=`)
On CUDA the kernel is Triton; on CPU it is the PyTorch reference (the Triton interpreter is not a speed test).

  python scripts/bench_routing.py                          # everything on CPU, ~2 minutes
  python scripts/bench_routing.py --kernels-only --device cuda
"""
from __future__ import annotations

import argparse
import platform
import random
import re
import statistics
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.lora import TaskRouter, default_encoder  # noqa: E402
from foundation.atomic import write_json  # noqa: E402
from foundation.timing import best_seconds, seconds  # noqa: E402
from tessera_kernels.lora_mixture import lora_mixture  # noqa: E402

_SLOT = re.compile(r"\{(\w+?)(\d?)\}")


@dataclass
class BenchTask:
    name: str
    family: str
    domain: str
    val: list[str]
    test: list[str]


def build_tasks(path: Path, n_val: int, n_test: int, seed: int = 0) -> list[BenchTask]:
    """Fill every task's templates; validation and test examples are disjoint samples of the filled set."""
    spec = yaml.safe_load(path.read_text())
    shared = spec.get("shared", {})
    tasks = []
    for domain, families in spec["domains"].items():
        for family, fam in families.items():
            slots = {**shared, **fam.get("slots", {})}
            for name, templates in fam["tasks"].items():
                filled = sorted({text for tpl in templates for text in _fill_all(tpl, slots)})
                rng = random.Random(f"{seed}:{name}")
                rng.shuffle(filled)
                if len(filled) < n_val + n_test:
                    raise ValueError(f"task {name} yields {len(filled)} distinct examples, needs {n_val + n_test}")
                tasks.append(BenchTask(name, family, domain, filled[:n_val], filled[n_val:n_val + n_test]))
    return tasks


def _fill_all(template: str, slots: dict, limit: int = 64) -> list[str]:
    """Up to `limit` fillings of a template; {x2} draws a second value from slot x, distinct from {x}."""
    rng = random.Random(template)
    out = set()
    for _ in range(limit * 4):
        chosen = {}

        def pick(match):
            base, suffix = match.group(1), match.group(2)
            key = base + suffix
            if key not in chosen:
                used = {v for k, v in chosen.items() if k.rstrip("0123456789") == base}
                choices = [v for v in slots[base] if v not in used] or slots[base]
                chosen[key] = rng.choice(choices)
            return chosen[key]

        out.add(_SLOT.sub(pick, template))
        if len(out) >= limit:
            break
    return sorted(out)


# ---- routing accuracy -------------------------------------------------------------------------------------
def routing_eval(tasks: list[BenchTask], encoder, k: int, temperature: float, min_confidence: float) -> dict:
    full = TaskRouter.build({t.name: t.val for t in tasks}, encoder=encoder,
                            task_adapters={t.name: t.name for t in tasks}, k=k, temperature=temperature,
                            min_confidence=min_confidence)
    by_name = {t.name: t for t in tasks}
    queries = [(t, q) for t in tasks for q in t.test]
    emb = encoder.encode([q for _, q in queries])
    regimes = {
        "in_distribution": (lambda t, o: True, lambda t, o: o.name == t.name),
        "semi_ood": (lambda t, o: o.name != t.name, lambda t, o: o.family == t.family),
        "ood": (lambda t, o: o.family != t.family, None),
    }
    results = {}
    for regime, (keep, correct) in regimes.items():
        hits1 = hits3 = fallback = conf = 0.0
        routers = {}
        for i, (task, query) in enumerate(queries):
            key = task.family if regime == "ood" else task.name
            if key not in routers:
                routers[key] = _subrouter(full, [o.name for o in tasks if keep(task, o)])
            (d,) = routers[key].route_embeddings(emb[i:i + 1], [query])
            if correct is not None:
                ok = [correct(task, by_name[n]) for n in d.tasks]
                hits1 += ok[0]
                hits3 += any(ok[:3])
            fallback += d.fallback
            conf += d.confidence
        n = len(queries)
        scored = correct is not None
        results[regime] = {"acc@1": hits1 / n if scored else None, "acc@3": hits3 / n if scored else None,
                           "fallback_rate": fallback / n, "mean_confidence": conf / n, "queries": n}
    return results


def _subrouter(full: TaskRouter, names: list[str]) -> TaskRouter:
    idx = [full.task_names.index(n) for n in names]
    return TaskRouter(full.encoder, names, full.representations[idx], {n: full.task_adapters[n] for n in names},
                      k=full.k, temperature=full.temperature, min_confidence=full.min_confidence)


# ---- routing latency --------------------------------------------------------------------------------------
def routing_latency(encoder, queries: list[str], n_tasks: int = 1500, repeats: int = 200) -> dict:
    """Per-query routing time after the encoder, with n_tasks tasks each owning one adapter.

    Timed with one intra-op thread, as a server's routing step runs: on a loaded machine, multi-threaded
    tiny matmuls mostly measure thread wake-ups."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _routing_latency(encoder, queries, n_tasks, repeats)
    finally:
        torch.set_num_threads(threads)


def _routing_latency(encoder, queries: list[str], n_tasks: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    reps = torch.nn.functional.normalize(torch.randn(n_tasks, encoder.dim, generator=gen), dim=-1)
    names = [f"task{i}" for i in range(n_tasks)]
    router = TaskRouter(encoder, names, reps, {n: {f"adapter{i}": 1.0} for i, n in enumerate(names)})
    emb = encoder.encode(queries)
    single = []
    for i in range(repeats):
        row = emb[i % len(queries)][None]
        single.append(seconds(lambda: router.route_embeddings(row), emb.device))
    batch = emb[:64]
    batched = seconds(lambda: [router.route_embeddings(batch) for _ in range(10)], emb.device) / (10 * len(batch))
    fresh = [f"{q} (variant {i})" for i, q in enumerate(queries[:64])]  # not in the disk cache
    inner = getattr(encoder, "encoder", encoder)
    encode = seconds(lambda: inner.encode(fresh), emb.device) / len(fresh)
    single.sort()
    return {"tasks": n_tasks, "route_ms_median": 1e3 * statistics.median(single),
            "route_ms_p99": 1e3 * single[int(0.99 * (len(single) - 1))], "route_ms_per_query_batch64": 1e3 * batched,
            "encode_ms_per_query_batch64": 1e3 * encode}


# ---- kernel speed -----------------------------------------------------------------------------------------
def _kernel_ms(fns: dict, device: torch.device, iters: int) -> dict[str, float]:
    """Best-of-`iters` milliseconds per call; on CUDA each sample is 10 calls, so the synchronisations around it
    cost little next to the kernels."""
    calls = 10 if device.type == "cuda" else 1
    best = best_seconds({k: (lambda f=f: [f() for _ in range(calls)]) for k, f in fns.items()}, device, iters,
                        warmup=3)
    return {k: 1e3 * s / calls for k, s in best.items()}


def _peft_layer(base: torch.nn.Linear, a_stack, b_stack):
    from peft import LoraConfig, get_peft_model

    rank = a_stack.shape[1]
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"])
    model = get_peft_model(torch.nn.Sequential(OrderedDict(proj=base)), cfg, adapter_name="a0")
    for i in range(1, a_stack.shape[0]):
        model.add_adapter(f"a{i}", cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for i in range(a_stack.shape[0]):
            layer.lora_A[f"a{i}"].weight.copy_(a_stack[i])
            layer.lora_B[f"a{i}"].weight.copy_(b_stack[i])
    return model.eval()


def kernel_case(device, dtype, d_model: int, rank: int, n_adapters: int, rows: int, per_row: int,
                iters: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(d_model, d_model, bias=False)
    a_stack = (torch.randn(n_adapters, rank, d_model, generator=gen) / d_model ** 0.5)
    b_stack = torch.randn(n_adapters, d_model, rank, generator=gen) / rank ** 0.5
    peft_model = _peft_layer(base, a_stack, b_stack).to(device=device, dtype=dtype)
    base = base.to(device=device, dtype=dtype)
    a_stack, b_stack = a_stack.to(device, dtype), b_stack.to(device, dtype)
    x = torch.randn(rows, per_row, d_model, generator=gen).to(device, dtype)
    one_slot = torch.arange(rows, dtype=torch.int32)[:, None] % n_adapters
    mix_slot = (one_slot + torch.tensor([[0, 1, 2]], dtype=torch.int32)) % n_adapters
    one = (one_slot.to(device), torch.ones(rows, 1, device=device))
    mix = (mix_slot.to(device), torch.tensor([[0.6, 0.3, 0.1]]).repeat(rows, 1).to(device))
    names = [f"a{int(s)}" for s in one_slot[:, 0]]

    def layer(slots, weights):
        y = torch.nn.functional.linear(x, base.weight).reshape(-1, d_model)
        return lora_mixture(x, y, a_stack, b_stack, slots, weights)

    with torch.no_grad():
        ours, theirs = layer(*one).view_as(x).float(), peft_model(x, adapter_names=names).float()
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2 * float(theirs.abs().max()))
        times = _kernel_ms({
            "base": lambda: torch.nn.functional.linear(x, base.weight),
            "one_lora": lambda: layer(*one),
            "mix3": lambda: layer(*mix),
            "peft_one": lambda: peft_model(x, adapter_names=names),
        }, device, iters)
    return {"d_model": d_model, "rank": rank, "adapters": n_adapters, "rows": rows, "tokens_per_row": per_row,
            "dtype": str(dtype).replace("torch.", ""), "ms": times,
            "mix3_over_one_lora": times["mix3"] / times["one_lora"],
            "mix3_over_peft_one": times["mix3"] / times["peft_one"],
            "lora_part_mix3_over_one": _part_ratio(times)}


def _part_ratio(times: dict) -> float | None:
    """(mix3 - base) / (one_lora - base): the LoRA work alone; None when noise swamps the difference."""
    one = times["one_lora"] - times["base"]
    return (times["mix3"] - times["base"]) / one if one > 0.02 * times["base"] else None


def kernel_bench(device: torch.device, quick: bool) -> list[dict]:
    if device.type == "cuda":
        cases = [(4096, 16, 64, 64, 1), (4096, 16, 64, 256, 1), (4096, 16, 64, 16, 128), (4096, 64, 64, 64, 1)]
        dtype, iters = torch.bfloat16, 50
    else:
        cases = [(1024, 16, 32, 16, 1), (1024, 16, 32, 4, 64)] if quick else \
            [(1024, 16, 32, 16, 1), (1024, 16, 32, 64, 1), (1024, 16, 32, 4, 64)]
        dtype, iters = torch.float32, 20
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # stable numbers on a shared machine; all four variants get the same thread
    try:
        return [kernel_case(device, dtype, d, r, n, rows, per_row, iters) for d, r, n, rows, per_row in cases]
    finally:
        torch.set_num_threads(threads)


# ---- reporting --------------------------------------------------------------------------------------------
def print_routing(results: dict) -> None:
    print(f"{'regime':<16}{'acc@1':>8}{'acc@3':>8}{'fallback':>10}{'conf':>8}{'n':>6}")
    for regime, r in results.items():
        print(f"{regime:<16}{_fmt(r['acc@1'], 3):>8}{_fmt(r['acc@3'], 3):>8}"
              f"{r['fallback_rate']:>10.3f}{r['mean_confidence']:>8.3f}{r['queries']:>6}")
    print("OOD: the query's family is unseen, so no task is correct (answer quality: scripts/bench_lora_e2e.py)")


def print_kernels(rows: list[dict], device: str) -> None:
    print(f"\nkernel speed on {device} (ms per layer call; ratios of full layer times)")
    print(f"{'d':>6}{'r':>4}{'rows':>6}{'tok':>5}{'base':>9}{'one':>9}{'mix3':>9}{'peft1':>9}"
          f"{'mix3/one':>10}{'mix3/peft':>11}{'lora part':>11}")
    for c in rows:
        t = c["ms"]
        print(f"{c['d_model']:>6}{c['rank']:>4}{c['rows']:>6}{c['tokens_per_row']:>5}{t['base']:>9.3f}"
              f"{t['one_lora']:>9.3f}{t['mix3']:>9.3f}{t['peft_one']:>9.3f}{c['mix3_over_one_lora']:>10.2f}"
              f"{c['mix3_over_peft_one']:>11.2f}{_fmt(c['lora_part_mix3_over_one']):>11}")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels-only", action="store_true", help="only the kernel speed table")
    parser.add_argument("--routing-only", action="store_true", help="only routing accuracy and latency")
    parser.add_argument("--quick", action="store_true", help="fewer kernel cases (CPU)")
    parser.add_argument("--tasks", type=Path, default=ROOT / "configs/lora/bench_tasks.yaml")
    parser.add_argument("--n-val", type=int, default=12)
    parser.add_argument("--n-test", type=int, default=6)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--min-confidence", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "torch": torch.__version__}
    if not args.kernels_only:
        tasks = build_tasks(args.tasks, args.n_val, args.n_test)
        families = {t.family for t in tasks}
        print(f"{len(tasks)} tasks in {len(families)} families, {args.n_val} validation / {args.n_test} test "
              f"examples each; k={args.k}, temperature={args.temperature}, min_confidence={args.min_confidence}")
        encoder = default_encoder()
        report["routing"] = routing_eval(tasks, encoder, args.k, args.temperature, args.min_confidence)
        report["routing_settings"] = {"tasks": len(tasks), "families": len(families), "k": args.k,
                                      "temperature": args.temperature, "min_confidence": args.min_confidence}
        print_routing(report["routing"])
        report["latency"] = routing_latency(encoder, [q for t in tasks for q in t.test])
        lat = report["latency"]
        print(f"\nrouting with {lat['tasks']} tasks (after the encoder): median {lat['route_ms_median']:.3f} ms, "
              f"p99 {lat['route_ms_p99']:.3f} ms per single query; {lat['route_ms_per_query_batch64']:.4f} ms per "
              f"query in batches of 64; encoder {lat['encode_ms_per_query_batch64']:.2f} ms per query (batch 64)")
    if not args.routing_only:
        report["kernels"] = kernel_bench(device, args.quick)
        print_kernels(report["kernels"], report["device"])
    name = "routing_kernels" if args.kernels_only else "routing"
    out = args.out or ROOT / "benchmarks" / "results" / f"{name}_{device.type}.json"
    write_json(out, report)
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()

"""tessera merge against mergekit on the same checkpoints, for every method both have, at size 1.

Set-up (once): a separate virtual environment with mergekit from PyPI, so its pins never touch the project's
environment; torch is installed first at the project's version, CPU build, so mergekit does not pull another.

    python scripts/bench_vs_mergekit.py --setup          # creates $TESSERA_CACHE/mergekit-venv
    python scripts/bench_vs_mergekit.py                  # runs both tools, prints the table, writes JSON

Both tools read the same mergekit YAML (tessera reads mergekit's format). Each run is a fresh process
timed from the outside; peak memory is the child's maximum resident set. The output tensors are compared
as max |tessera − mergekit| / max |mergekit| over every tensor. Methods with random drops (dare_*,
della*) run with `--rng mergekit`: tessera then draws from the stream mergekit draws from (torch's
generator seeded with `--random-seed`, tensors in mergekit's order), so at density < 1 they are compared
exactly too.

`--memory` measures tessera's peak memory for every config on a larger model against the bound
(M + 2) × the largest block in float32 (see `memory_check` for what is counted).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from foundation.atomic import write_json  # noqa: E402
from foundation.cache import cache_dir  # noqa: E402

VENV = cache_dir("mergekit-venv")
TORCH = "torch==2.13.0"


def setup(venv: Path, torch_index: str | None) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    # torch first, at the project's version, so mergekit's requirement is already met; `--torch-index` names
    # an index with CPU builds where the default one would bring a CUDA build
    subprocess.run(pip + [TORCH] + (["--extra-index-url", torch_index] if torch_index else []), check=True)
    subprocess.run(pip + ["mergekit"], check=True)


def make_checkpoints(root: Path, hidden: int, layers: int, vocab: int, tasks: int) -> dict[str, Path]:
    """A tiny Llama base and `tasks` fine-tuned-like perturbations of it, float32 safetensors."""
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 8 * 8,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = T.LlamaForCausalLM(cfg)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for i in range(tasks):
        g = torch.Generator().manual_seed(100 + i)
        model = T.LlamaForCausalLM(cfg)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * p.detach().abs().mean() * torch.randn(p.shape, generator=g))
        paths[f"ft{i}"] = root / f"ft{i}"
        model.save_pretrained(paths[f"ft{i}"])
    return paths


def configs(p: dict[str, Path]) -> dict[str, dict]:
    b, a, c, d = str(p["base"]), str(p["ft0"]), str(p["ft1"]), str(p["ft2"])
    three = lambda params: [{"model": m, "parameters": dict(params, weight=w)} for m, w in ((a, 1.0), (c, 0.6), (d, 0.4))]
    gta = lambda method, params, extra=None: {"merge_method": method, "base_model": b, "models": three(params),
                                              "parameters": extra or {}, "dtype": "float32"}
    return {
        "linear": {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.7}},
                                                        {"model": c, "parameters": {"weight": 0.3}}], "dtype": "float32"},
        "task_arithmetic": gta("task_arithmetic", {}, {"lambda": 0.8}),
        "ties": gta("ties", {"density": 0.5}),
        "ties (density gradient)": gta("ties", {"density": [0.3, 0.9]}, {"normalize": True}),
        "dare_ties": gta("dare_ties", {"density": 1.0}),
        "dare_linear": gta("dare_linear", {"density": 1.0}),
        "breadcrumbs": gta("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
        "breadcrumbs_ties": gta("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05}),
        "della": gta("della", {"density": 1.0}),
        "della_linear": gta("della_linear", {"density": 1.0}),
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": [{"model": a}, {"model": c}, {"model": d}],
                        "dtype": "float32"},
        "slerp": {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": c}], "dtype": "float32",
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                                       {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]}, {"value": 0.5}]}},
        "nuslerp": {"merge_method": "nuslerp", "base_model": b, "models": [{"model": a, "parameters": {"weight": 0.3}},
                                                                           {"model": c, "parameters": {"weight": 0.7}}],
                    "dtype": "float32"},
        "passthrough": {"merge_method": "passthrough", "models": [{"model": a, "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}],
                        "dtype": "float32"},
        # random drops: tessera draws mergekit's stream (`--rng mergekit`)
        "dare_ties (density 0.5)": gta("dare_ties", {"density": 0.5}),
        "dare_linear (density 0.5)": gta("dare_linear", {"density": 0.5}),
        "della (density 0.5)": gta("della", {"density": 0.5, "epsilon": 0.1}),
        "della_linear (density 0.5)": gta("della_linear", {"density": [0.3, 0.7], "epsilon": 0.1}),
    }


def timed(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """Wall seconds and peak RSS (bytes) of one fresh process."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    rss = next(int(line.split()[1]) for line in r.stderr.splitlines()[::-1] if line.startswith("MAXRSS_KB"))
    return wall, rss * 1024, r.stderr


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(ours: dict, theirs: dict) -> float:
    if set(ours) != set(theirs):
        raise RuntimeError(f"tensor names differ: only tessera {sorted(set(ours) - set(theirs))[:3]}, "
                           f"only mergekit {sorted(set(theirs) - set(ours))[:3]}")
    worst = 0.0
    for n, ref in theirs.items():
        a, r = ours[n].double(), ref.double()
        worst = max(worst, float((a - r).abs().max() / r.abs().max().clamp(min=1e-30)))
    return worst


RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")


def tessera_cmd(cfg_path: Path, out: Path, cfg: dict, size: str = "1") -> list[str]:
    random = cfg["merge_method"] in RANDOM
    return [sys.executable, "-m", "merge.cli", "merge", str(cfg_path), "--out", str(out), "--size", size, "--json",
            *(["--rng", "mergekit", "--param", "seed=0"] if random else [])]


# glibc's malloc raises its mmap threshold (up to 32 MiB) each time a large buffer is freed, and then serves
# block-sized tensors from its heap, where up to twice that threshold of freed memory stays resident: the
# same merge's peak then varies by tens of MiB from run to run. A fixed threshold keeps every buffer of
# 128 KiB or more in its own mapping, returned to the system when freed. The memory check runs every
# measured command (and its baselines) both ways.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def memory_check(root: Path, env: dict, hidden: int, layers: int, vocab: int, only=None, save=None, repeats: int = 2) -> dict:
    """tessera's peak memory for every config (size 1), TIES with each tie rule and the task-arithmetic size
    curve, against (M + 2) × the largest block in float32, M the config's number of models.

    What is counted: the peak resident set (anonymous memory and mapped file pages alike) of the merge's
    process, minus the peak of the same command, config and allocator settings on a tiny copy of the model
    (hidden 64, vocabulary 1024, the same layers and tensor names; its largest block, 0.25 MiB, is in the
JSON). The
    difference is what grows with the model; the tiny run's peak is Python, torch, the code pages the merge
    touches, thread pools and the merge's fixed structures. The import-only baseline of earlier rounds left
    about 15 MiB of those (10 MiB of libtorch code paged in by the first use of its kernels) in the count."""
    from foundation.io import Checkpoint
    from merge.blocks import assign
    from merge.config import load_spec

    paths = make_checkpoints(root / "model", hidden, layers, vocab, tasks=3)
    tiny = make_checkpoints(root / "tiny", 64, layers, 1024, tasks=3)
    ck = Checkpoint(paths["base"])
    largest = max(sum(math.prod(ck.shape[n]) * 4 for n in b.tensors) for b in assign(ck.names))
    ck = Checkpoint(tiny["base"])
    tiny_largest = max(sum(math.prod(ck.shape[n]) * 4 for n in b.tensors) for b in assign(ck.names))
    _, baseline, _ = timed([sys.executable, "-c", "import torch, merge.cli, merge.flexmerge, merge.stats, merge.artifact"], env)
    big, small = configs(paths), configs(tiny)
    runs = [(name, name, "1", []) for name in big]
    index_rule = ["--param", "tie_break=index"]
    runs.insert(3, ("ties (tie_break index)", "ties", "1", index_rule))
    runs.insert(8, ("breadcrumbs (tie_break index)", "breadcrumbs", "1", index_rule))
    runs.insert(10, ("breadcrumbs_ties (tie_break index)", "breadcrumbs_ties", "1", index_rule))
    runs.append(("task_arithmetic (size curve)", "task_arithmetic", "all", []))
    rows = []
    for i, (name, key, size, extra) in enumerate(runs):
        if only and name not in only:
            continue
        paths_of = {}
        for which, cfgs in (("model", big), ("tiny", small)):
            paths_of[which] = root / f"mem-{i}-{which}.yaml"
            paths_of[which].write_text(yaml.safe_dump(cfgs[key]))
        M = len(load_spec(str(paths_of["model"])).models)
        bound = (M + 2) * largest
        row = {"method": name, "size": size, "models": M, "bound_bytes": bound}
        for allocator, knobs, times in (("fixed_mmap_threshold", FIXED_MMAP_THRESHOLD, repeats), ("glibc_default", {}, 1)):
            run_env = {**env, **knobs}
            cmd = lambda which, j: tessera_cmd(paths_of[which], root / f"mem-{i}-{which}-{allocator}-{j}", big[key], size) + extra
            _, fixed, _ = timed(cmd("tiny", 0), run_env)
            peaks = [timed(cmd("model", j), run_env)[1] for j in range(times)]
            above = max(peaks) - fixed
            row[allocator] = {"peak_rss_bytes": peaks, "tiny_model_peak_rss_bytes": fixed, "above_tiny_bytes": above,
                              "above_import_bytes": max(peaks) - baseline, "within": above <= bound}
        rows.append(row)
        f, d = row["fixed_mmap_threshold"], row["glibc_default"]
        print(f"memory {name:<34} size {size:>3}: " + "/".join(f"{(p - f['tiny_model_peak_rss_bytes']) / 2**20:.0f}" for p in f["peak_rss_bytes"])
              + f" MiB above the tiny model's run (glibc default: {d['above_tiny_bytes'] / 2**20:.0f}); "
              f"(M + 2) x largest block = {bound / 2**20:.0f} MiB", flush=True)
        result = {"hidden": hidden, "layers": layers, "vocab": vocab, "tasks": 3, "largest_block_float32_bytes": largest,
                  "import_baseline_rss_bytes": baseline, "tiny_largest_block_float32_bytes": tiny_largest,
                  "counted": "peak RSS of the merge minus peak RSS of the same command, config and allocator settings on the tiny model",
                  "fixed_mmap_threshold_env": FIXED_MMAP_THRESHOLD, "runs": rows}
        if save is not None:
            save(result)  # after every run: a long check that is stopped keeps what it measured
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="create the mergekit venv and exit")
    ap.add_argument("--venv", type=Path, default=VENV)
    ap.add_argument("--torch-index", help="--setup: an extra package index with CPU builds of torch")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--only", nargs="*", help="run only these methods")
    ap.add_argument("--memory", action="store_true", help="only measure tessera's peak memory against (M + 2) x the largest block")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mergekit_vs_tessera_cpu.json")
    args = ap.parse_args()
    if args.setup:
        setup(args.venv, args.torch_index)
        return 0
    if args.memory:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
        previous = json.loads(args.out.read_text()) if args.out.exists() else {}
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            memory_check(Path(tmp), env, 1024, 4, 8192, args.only, lambda mem: write_json(args.out, {**previous, "memory": mem}))
        print(f"wrote {args.out}")
        return 0
    mergekit = args.venv / "bin" / "mergekit-yaml"
    if not mergekit.exists():
        raise SystemExit(f"no mergekit at {mergekit}: run `python {sys.argv[0]} --setup` first")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-mergekit-") as tmp:
        tmp = Path(tmp)
        env.setdefault("HF_HOME", str(tmp / "hf"))
        paths = make_checkpoints(tmp / "ckpt", args.hidden, args.layers, args.vocab, tasks=3)
        base = read_all(paths["base"])
        numel = sum(t.numel() for t in base.values())
        for name, cfg in configs(paths).items():
            if args.only and name not in args.only:
                continue
            cfg_path = tmp / f"{len(rows)}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            mk_out, ts_out = tmp / f"mk{len(rows)}", tmp / f"ts{len(rows)}"
            mk_wall, mk_rss, _ = timed([str(mergekit), str(cfg_path), str(mk_out), "--random-seed", "0", "--quiet"], env)
            ts_wall, ts_rss, _ = timed(tessera_cmd(cfg_path, ts_out, cfg), env)
            diff = compare(read_all(ts_out), read_all(mk_out))
            rows.append({"method": name, "rng": "mergekit" if cfg["merge_method"] in RANDOM else None,
                         "max_relative_difference": diff, "tessera_seconds": round(ts_wall, 2), "mergekit_seconds": round(mk_wall, 2),
                         "tessera_peak_rss_bytes": ts_rss, "mergekit_peak_rss_bytes": mk_rss,
                         "time_ratio": round(ts_wall / mk_wall, 3), "memory_ratio": round(ts_rss / mk_rss, 3),
                         "load_average_1min": round(os.getloadavg()[0], 2)})
            print(f"{name:<28} {diff:10.2e}  {ts_wall:6.2f} s {mk_wall:6.2f} s ({ts_wall / mk_wall:4.2f}x)  "
                  f"{ts_rss / 2**20:5.0f} MiB {mk_rss / 2**20:5.0f} MiB ({ts_rss / mk_rss:4.2f}x)", flush=True)
    result = {"what": "tessera merge vs mergekit-yaml, size 1, same mergekit YAML, fresh process each",
              "checkpoints": {"family": "llama", "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                              "parameters_per_model": numel, "dtype": "float32", "fine_tuned": 3},
              "mergekit": subprocess.run([str(args.venv / "bin" / "python"), "-c",
                                          "import importlib.metadata as m; print(m.version('mergekit'))"],
                                         capture_output=True, text=True).stdout.strip(),
              "torch": torch.__version__, "cpu_cores": os.cpu_count(),
              "load_average_1min": os.getloadavg()[0], "rows": rows}
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""FlexMerge evidence: quality on a real dataset, speed and memory at ViT-B/32 scale.

quality: a small ViT is pretrained on scikit-learn's digits (1797 real 8x8 scans that ship inside the
  package), fine-tuned on 8 tasks derived from it (rotations, flip, inversion, and relabelings), and
  merged with every algorithm at sizes 1x..8x through the real pipeline (`tessera merge` artifacts,
  `load_task_model`). Reports per-task accuracy normalised to the fine-tuned models; plots it vs size.
speed: writes M synthetic ViT-B/32-shaped checkpoints (CLIPVisionModelWithProjection, ~88M parameters,
  task vectors = a shared cluster direction + noise) under a temp dir and times
  `tessera merge --size all` on them in a fresh process: wall time and peak resident memory.

    python scripts/bench_flexmerge.py               # both parts, full size (~10 GB of temp files)
    python scripts/bench_flexmerge.py --quick       # small and fast
    python scripts/bench_flexmerge.py speed --tasks 30 --params 88e6
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from foundation.atomic import write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------------------------- speed
def vit_b32_shapes(target_params: float) -> tuple[object, dict[str, tuple[int, ...]]]:
    """CLIP ViT-B/32 vision tower shapes; fewer layers (same width) when a smaller model is asked for."""
    import transformers as T

    cfg = T.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             image_size=224, patch_size=32, projection_dim=512)
    per_layer = 4 * 768 * 768 + 2 * 768 * 3072 + 4 * 768 + 768 + 3072 + 4 * 768
    fixed = 88e6 - 12 * per_layer
    cfg.num_hidden_layers = max(1, min(12, round((target_params - fixed) / per_layer)))
    cfg.architectures = ["CLIPVisionModelWithProjection"]
    with torch.device("meta"):
        model = T.CLIPVisionModelWithProjection(cfg)
    return cfg, {n: tuple(p.shape) for n, p in model.state_dict().items()}


def write_synthetic(root: Path, tasks: int, target_params: float, clusters: int = 5) -> tuple[Path, dict[str, Path], int]:
    """Base (seeded random) and `tasks` fine-tunes θ_k = θ_0 + 1e-3 (c_{k mod clusters} + n_k).

    Cluster directions c and noises n are windows of one random pool per tensor at different offsets:
    nearly orthogonal, cheap to make, and they give the greedy order real structure to find."""
    from safetensors.torch import save_file

    cfg, shapes = vit_b32_shapes(target_params)
    n_params = sum(math.prod(s) for s in shapes.values())
    span = 4096 * (tasks + clusters + 1)

    def save(folder: Path, tensors: dict):
        folder.mkdir(parents=True)
        cfg.save_pretrained(folder)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    base, pools = {}, {}
    for i, (n, s) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(i)
        numel = math.prod(s)
        pools[n] = torch.randn(numel + span, generator=g)
        base[n] = torch.ones(s) if n.endswith(("norm1.weight", "norm2.weight")) else 0.02 * pools[n][:numel].view(s)
    save(root / "base", base)
    models = {}
    for k in range(tasks):
        tensors = {}
        for n, s in shapes.items():
            numel, pool = math.prod(s), pools[n]
            c0, n0 = 4096 * (1 + k % clusters), 4096 * (1 + clusters + k)
            t = torch.add(pool[c0 : c0 + numel], pool[n0 : n0 + numel]).mul_(1e-3).view(s)
            tensors[n] = t.add_(base[n])
        name = f"task{k:02d}"
        models[name] = root / name
        save(models[name], tensors)
        del tensors
    return root / "base", models, n_params


# A small helper process starts the measured command and reports its peak RSS. Measuring from this
# (large) process would be wrong: a forked child's maxrss starts from its parent's resident size.
_HELPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
code = subprocess.call(sys.argv[2:], stdout=open(sys.argv[1], "w"))
wall = time.perf_counter() - t0
print(json.dumps({"code": code, "wall": wall, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


# glibc's malloc with a fixed mmap threshold (see bench_vs_mergekit.py): freed buffers of 128 KiB or more go
# back to the system instead of staying in its heap. One extra run is measured with it.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def timed_run(cmd: list[str], extra_env: dict | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak resident bytes and stdout of one fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", **(extra_env or {})}
    with tempfile.NamedTemporaryFile("r", suffix=".out") as out:
        proc = subprocess.run([sys.executable, "-c", _HELPER, out.name, *cmd], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"measurement helper failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if result["code"] != 0:
            raise RuntimeError(f"{' '.join(cmd[:5])} failed:\n{proc.stderr[-3000:]}")
        return result["wall"], result["maxrss_kb"] * 1024, out.read()


def bench_speed(tasks: int, params: float, method: str, workdir: str | None) -> dict:
    """Write the checkpoints, then time `--size all` in fresh processes: through `python -m merge.cli`
    (FlexMerge alone) and through the full `tessera` CLI (which also imports the rest of the engine)."""
    tmp = Path(tempfile.mkdtemp(prefix="flexmerge-bench-", dir=workdir))
    try:
        t0 = time.perf_counter()
        base, models, n_params = write_synthetic(tmp, tasks, params)
        write_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in tmp.rglob("*.safetensors"))
        cfg = {"base": str(base), "models": {k: str(v) for k, v in models.items()}, "method": method,
               "size": "all", "blocks": "clip", "out": str(tmp / "curve")}
        (tmp / "merge.yaml").write_text(yaml.safe_dump(cfg))
        os.sync()  # let writeback of the fresh files finish so it does not run during the timed merges
        runs = []
        cli = [sys.executable, "-m", "merge.cli"]
        for entry, prefix, knobs in (("merge.cli", cli, None), ("merge.cli", cli, None),
                                     ("tessera", [sys.executable, "-m", "engine.cli"], None),
                                     ("merge.cli, fixed mmap threshold", cli, FIXED_MMAP_THRESHOLD)):
            shutil.rmtree(tmp / "curve", ignore_errors=True)
            wall, rss, out = timed_run([*prefix, "merge", str(tmp / "merge.yaml"), "--json"], knobs)
            report = json.loads(out)
            runs.append({"entry": entry, "wall_seconds": round(wall, 2), "merge_seconds": report["seconds"],
                         "peak_rss_bytes": rss, "load_average_1min": round(os.getloadavg()[0], 2)})
        _, baseline, _ = timed_run([sys.executable, "-c", "import torch, merge.cli, merge.flexmerge, merge.stats, merge.artifact"])
        from foundation.io import Checkpoint
        from merge.blocks import assign

        ck = Checkpoint(base)
        largest = max(sum(math.prod(ck.shape[n]) * 4 for n in b.tensors) for b in assign(ck.names, "clip"))
        plan = json.loads((tmp / "curve" / "plan.json").read_text())
        return {
            "tasks": tasks, "params_per_model": n_params, "method": method, "checkpoint_bytes_on_disk": disk,
            "write_seconds": round(write_s, 1), "runs": runs, "import_baseline_rss_bytes": baseline,
            "largest_block_float32_bytes": largest, "bound_bytes": (tasks + 2) * largest, "states": len(plan["curve"]),
            "steps": len(plan["steps"]), "blocks": len(plan["blocks"]),
            "curve": [(round(p["size"], 3), round(p["mean_relative_error"], 4)) for p in plan["curve"]],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------- quality
TASKS = {
    # name: (image transform, label map, number of classes)
    "rot90": (lambda x: torch.rot90(x, 1, (-2, -1)), lambda y: y, 10),
    "rot180": (lambda x: torch.rot90(x, 2, (-2, -1)), lambda y: y, 10),
    "rot270": (lambda x: torch.rot90(x, 3, (-2, -1)), lambda y: y, 10),
    "flip": (lambda x: torch.flip(x, (-1,)), lambda y: y, 10),
    "invert": (lambda x: 1.0 - x, lambda y: y, 10),
    "parity": (lambda x: x, lambda y: y % 2, 2),
    "mod3": (lambda x: x, lambda y: y % 3, 3),
    "loops": (lambda x: x, lambda y: torch.isin(y, torch.tensor([0, 6, 8, 9])).long(), 2),
}

# Fixed hyper-parameters (λ is chosen per method on a validation split at 1x, as the papers do).
METHODS = {
    "average": {},
    "task_arithmetic": {"normalize": True},  # λ · mean per group, as the FlexMerge reference scales groups
    "ties": {"density": 0.2},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "magnitude_prune": {"density": 0.2},
    "pcb": {"ratio": 0.1},
    "consensus": {"k": 2, "tall_lambda": 0.4},
    "tall_masks": {"tall_lambda": 0.4},
    "emr": {},
    "tsv_m": {},
    "iso_c": {},
    "iso_cts": {},
}
LAMBDAS = (0.1, 0.3, 0.5, 1.0)


def digits_data(seed: int = 0):
    """scikit-learn's digits (real scans shipped with the package), split 60/20/20, pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n = len(y)
    cut1, cut2 = int(0.6 * n), int(0.8 * n)
    return {"train": (x[perm[:cut1]], y[perm[:cut1]]), "val": (x[perm[cut1:cut2]], y[perm[cut1:cut2]]),
            "test": (x[perm[cut2:]], y[perm[cut2:]])}


def task_split(data, task, split):
    transform, relabel, _ = TASKS[task]
    x, y = data[split]
    return transform(x), relabel(y)


def tiny_vit():
    import transformers as T

    cfg = T.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    cfg.architectures = ["ViTForImageClassification"]
    return T.ViTForImageClassification(cfg)


def train(model, x, y, classes, epochs, lr, seed):
    """Cross-entropy on the first `classes` logits of the shared 10-way head."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            logits = model(pixel_values=x[idx]).logits[:, :classes]
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y, classes) -> float:
    return float((model(pixel_values=x).logits[:, :classes].argmax(-1) == y).float().mean())


def evaluate_artifact(artifact, data, split) -> dict[str, float]:
    from merge.artifact import load_task_model

    out = {}
    for task, (_, _, classes) in TASKS.items():
        x, y = task_split(data, task, split)
        out[task] = accuracy(load_task_model(artifact, task), x, y, classes)
    return out


def merge_artifact(workdir: Path, base: Path, models: dict, method: str, params: dict, size, name: str):
    from merge.config import load_spec
    from merge.flexmerge import run

    out = workdir / name
    cfg = {"base": str(base), "models": {k: str(v) for k, v in models.items()}, "method": method,
           "params": params, "size": size, "blocks": "vit", "out": str(out), "overwrite": True}
    report = run(load_spec(None, cfg))
    return out, report["size"]["multiplier"]


def get_method(name):
    from merge.methods import get

    return get(name)


def bench_quality(sizes: list[float], methods: list[str], pre_epochs: int, ft_epochs: int, workdir: str | None) -> dict:
    # One thread: the model is tiny, and a second thread only adds synchronisation (8x slower steps measured
    # on the shared 2-core machine). The speed part runs in its own processes with torch's default.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    data = digits_data()
    tmp = Path(tempfile.mkdtemp(prefix="flexmerge-quality-", dir=workdir))
    try:
        t0 = time.perf_counter()
        base_model = train(tiny_vit(), *data["train"], 10, pre_epochs, 1e-3, seed=0)
        base_model.save_pretrained(tmp / "base")
        zero_shot, finetuned, models = {}, {}, {}
        for i, (task, (_, _, classes)) in enumerate(TASKS.items()):
            x, y = task_split(data, task, "test")
            zero_shot[task] = accuracy(base_model, x, y, classes)
            model = tiny_vit()
            model.load_state_dict(base_model.state_dict())
            model = train(model, *task_split(data, task, "train"), classes, ft_epochs, 5e-4, seed=i + 1)
            finetuned[task] = accuracy(model, x, y, classes)
            models[task] = tmp / task
            model.save_pretrained(models[task])
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = {}
        for method in methods:
            params = dict(METHODS[method])
            if "lambda" in get_method(method).defaults:
                best = None
                for lam in LAMBDAS:
                    # chosen with everything merged (1x, or the smallest size of a method with modulators)
                    art, _ = merge_artifact(tmp, tmp / "base", models, method, {**params, "lambda": lam}, "min", "val")
                    acc = sum(evaluate_artifact(art, data, "val").values())
                    if best is None or acc > best[0]:
                        best = (acc, lam)
                params["lambda"] = best[1]
            rows = []
            for size in sizes:
                try:
                    art, reached = merge_artifact(tmp, tmp / "base", models, method, params, size, "test")
                except ValueError:
                    rows.append({"target": size, "size": None})  # below the method's smallest reachable size
                    continue
                accs = evaluate_artifact(art, data, "test")
                norm = {t: accs[t] / finetuned[t] for t in accs}
                rows.append({"target": size, "size": reached, "accuracy": accs, "normalized": norm,
                             "mean_normalized": sum(norm.values()) / len(norm)})
            results[method] = {"params": params, "sizes": rows}
            print(f"  {method:<16} λ={params.get('lambda', '-')}: " + " ".join(
                f"{r['size']:.2f}x={100 * r['mean_normalized']:.1f}" for r in rows if r["size"] is not None), flush=True)
        return {
            "dataset": "sklearn digits (1797 8x8 scans), 60/20/20 split",
            "model": "ViT (4 layers, hidden 64, patch 2) with a shared 10-way head",
            "tasks": list(TASKS), "pretrain_epochs": pre_epochs, "finetune_epochs": ft_epochs,
            "zero_shot": zero_shot, "finetuned": finetuned, "train_seconds": round(train_s, 1),
            "merge_eval_seconds": round(time.perf_counter() - t0, 1), "results": results,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------- reporting
def print_quality(q: dict) -> None:
    sizes = sorted({r["target"] for m in q["results"].values() for r in m["sizes"]})
    print(f"\nQuality: mean accuracy normalised to the fine-tuned models (%), {len(q['tasks'])} tasks, "
          f"{q['dataset']}")
    zs = sum(q["zero_shot"][t] / q["finetuned"][t] for t in q["tasks"]) / len(q["tasks"])
    print("fine-tuned accuracy: " + ", ".join(f"{t} {100 * a:.1f}" for t, a in q["finetuned"].items()))
    print(f"pretrained (zero-shot) normalised: {100 * zs:.1f}")
    print(f"{'method':<16}{'λ':>5} " + "".join(f"{f'{s:g}x':>8}" for s in sizes))
    for method, res in q["results"].items():
        cells = {r["target"]: r for r in res["sizes"]}
        row = "".join(f"{100 * cells[s]['mean_normalized']:8.1f}" if cells.get(s, {}).get("size") else f"{'-':>8}" for s in sizes)
        print(f"{method:<16}{str(res['params'].get('lambda', '')):>5} {row}")
    print("(size targets; '-' = below the method's smallest size: masks/scales need the base plus a unified vector)")


def print_speed(sp: dict) -> None:
    print(f"\nSpeed: `--size all` ({sp['method']}) on {sp['tasks']} checkpoints of {sp['params_per_model'] / 1e6:.1f}M "
          f"parameters ({sp['checkpoint_bytes_on_disk'] / 1e9:.1f} GB of safetensors), {sp['blocks']} blocks, "
          f"{sp['steps']} merge steps, {sp['states']} sizes from {sp['curve'][0][0]:g}x to {sp['curve'][-1][0]:g}x")
    print(f"{'entry point':<34}{'wall s':>9}{'merge s':>9}{'peak RSS GiB':>14}{'above import MiB':>18}{'load avg':>10}")
    for r in sp["runs"]:
        print(f"{r['entry']:<34}{r['wall_seconds']:>9.2f}{r['merge_seconds']:>9.2f}{r['peak_rss_bytes'] / 2**30:>14.2f}"
              f"{(r['peak_rss_bytes'] - sp['import_baseline_rss_bytes']) / 2**20:>18.0f}{r['load_average_1min']:>10.2f}")
    print(f"(M + 2) x largest block ({sp['largest_block_float32_bytes'] / 2**20:.1f} MiB in float32) = "
          f"{sp['bound_bytes'] / 2**20:.0f} MiB")


def plot(q: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.cm.tab20.colors
    for i, (method, res) in enumerate(q["results"].items()):
        pts = [(r["size"], 100 * r["mean_normalized"]) for r in res["sizes"] if r["size"] is not None]
        ax.plot(*zip(*pts), marker="os^"[i % 3], ms=3, color=colors[(2 * i) % 20 + (i >= 10)], label=method)
    zs = sum(q["zero_shot"][t] / q["finetuned"][t] for t in q["tasks"]) / len(q["tasks"])
    ax.axhline(100 * zs, color="gray", ls=":", label="pretrained")
    ax.axhline(100, color="black", ls="--", lw=0.8)
    ax.set_xlabel("artifact size (× one model)")
    ax.set_ylabel("accuracy normalised to fine-tuned (%)")
    ax.set_title(f"FlexMerge on digits: {len(q['tasks'])} tasks, tiny ViT")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", choices=["all", "quality", "speed"], default="all")
    parser.add_argument("--quick", action="store_true", help="small settings for a fast check")
    parser.add_argument("--tasks", type=int, default=None, help="speed: number of fine-tuned checkpoints (30)")
    parser.add_argument("--params", type=float, default=None, help="speed: parameters per checkpoint (88e6)")
    parser.add_argument("--method", default="task_arithmetic", help="speed: merge method for the size curve")
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: system temp)")
    parser.add_argument("--out", default=None, help="JSON results (default: benchmarks/results/flexmerge_cpu[_quick].json)")
    parser.add_argument("--png", default=None, help="plot (default: benchmarks/results/flexmerge_accuracy_size[_quick].png)")
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    args.out = args.out or str(RESULTS / f"flexmerge_cpu{suffix}.json")
    args.png = args.png or str(RESULTS / f"flexmerge_accuracy_size{suffix}.png")
    # Running one part keeps the other part's last results in the same file.
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    result = {**previous, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                      "torch": torch.__version__, "python": platform.python_version()},
              "quick": args.quick}
    if args.part in ("all", "quality"):
        sizes = [1, 2, 4, 8] if args.quick else [1, 1.5, 2, 3, 4, 5, 6, 8]
        methods = ["task_arithmetic", "ties", "emr"] if args.quick else list(METHODS)
        t0 = time.perf_counter()
        result["quality"] = bench_quality(sizes, methods, 10 if args.quick else 30, 5 if args.quick else 10, args.workdir)
        result["quality"]["seconds"] = round(time.perf_counter() - t0, 1)
        print_quality(result["quality"])
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        plot(result["quality"], Path(args.png))
        print(f"plot: {args.png}")
    if args.part in ("all", "speed"):
        tasks = args.tasks or (6 if args.quick else 30)
        params = args.params or (20e6 if args.quick else 88e6)
        result["speed"] = bench_speed(tasks, params, args.method, args.workdir)
        print_speed(result["speed"])
    write_json(args.out, result)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

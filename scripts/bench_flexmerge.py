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
import resource
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
    """Base (seeded random) and `tasks` fine-tunes: θ_k = θ_0 + 1e-3 (c_{k mod clusters} + n_k)."""
    from safetensors.torch import save_file

    cfg, shapes = vit_b32_shapes(target_params)
    n_params = sum(math.prod(s) for s in shapes.values())

    def save(folder: Path, tensors: dict):
        folder.mkdir(parents=True)
        cfg.save_pretrained(folder)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    base = {}
    for i, (n, s) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(i)
        base[n] = torch.ones(s) if n.endswith("norm1.weight") or n.endswith("norm2.weight") else 0.02 * torch.randn(s, generator=g)
    save(root / "base", base)
    models = {}
    for k in range(tasks):
        tensors = {}
        for i, (n, s) in enumerate(shapes.items()):
            gc = torch.Generator().manual_seed(10_000 * (k % clusters + 1) + i)
            gn = torch.Generator().manual_seed(10_000_000 * (k + 1) + i)
            t = torch.randn(s, generator=gc)
            t.add_(torch.randn(s, generator=gn)).mul_(1e-3).add_(base[n])
            tensors[n] = t
        models[f"task{k:02d}"] = root / f"task{k:02d}"
        save(models[f"task{k:02d}"], tensors)
        del tensors
    return root / "base", models, n_params


def bench_speed(tasks: int, params: float, method: str, workdir: str | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="flexmerge-bench-", dir=workdir))
    try:
        t0 = time.perf_counter()
        base, models, n_params = write_synthetic(tmp, tasks, params)
        write_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in tmp.rglob("*.safetensors"))
        cfg = {"base": str(base), "models": {k: str(v) for k, v in models.items()}, "method": method,
               "size": "all", "blocks": "clip", "out": str(tmp / "curve")}
        (tmp / "merge.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "engine.cli", "merge", str(tmp / "merge.yaml"), "--json"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            raise RuntimeError(f"tessera merge failed:\n{proc.stderr[-3000:]}")
        report = json.loads(proc.stdout)
        plan = json.loads((tmp / "curve" / "plan.json").read_text())
        return {
            "tasks": tasks, "params_per_model": n_params, "method": method, "checkpoint_bytes_on_disk": disk,
            "write_seconds": round(write_s, 1), "wall_seconds": round(wall, 2), "inner_seconds": report["seconds"],
            "peak_rss_bytes": peak * 1024 if peak > before else report["peak_rss_bytes"],
            "states": report["states"], "steps": len(plan["steps"]), "blocks": len(plan["blocks"]),
            "curve": [(round(p["size"], 3), round(p["mean_relative_error"], 4)) for p in plan["curve"]],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

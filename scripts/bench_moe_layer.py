"""Benchmark one MoE layer's experts: tessera's backends against Hugging Face eager and transformers' grouped_mm.

Every implementation gets the same tokens, the same routing (top-k ids and weights drawn uniform or Zipf-skewed)
and the same weights; the router itself is identical everywhere and cheap, so it is left out. Ratios are
measured in one run on one device. On GPU the table also gives TFLOP/s and the percentage of the roofline
bound (the larger of compute time at peak FLOP/s and weight+activation traffic at peak bandwidth).

    python scripts/bench_moe_layer.py                       # CPU defaults, a few minutes
    python scripts/bench_moe_layer.py --device cuda --dtype bfloat16 --out benchmarks/results
    python scripts/bench_moe_layer.py --decode-graphs     # + a whole MoE block (router included) at decode
                                                          #   batches, eager against a CUDA-graph replay (GPU)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.moe.experts import ExpertWeights, run_experts  # noqa: E402
from foundation.atomic import write_json  # noqa: E402
from foundation.timing import best_seconds, event_seconds  # noqa: E402
from tessera_kernels import triton_available  # noqa: E402

# name: (hidden, ffn, top_k, gated, activation)
SHAPES = {
    "switch-base": (768, 3072, 1, False, "relu"),
    "mixtral": (4096, 14336, 2, True, "silu"),
    "mixtral-small": (1024, 3584, 2, True, "silu"),  # Mixtral's ratios at a quarter of the width, for CPU
}
# Peak dense bf16 FLOP/s and HBM bandwidth (references.md).
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


def routing(num_tokens: int, num_experts: int, top_k: int, skew: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids without repeats per token: uniform, or Zipf (s = 1.2) over a shuffled expert order."""
    if skew == "uniform":
        probs = torch.ones(num_experts)
    else:
        probs = 1.0 / torch.arange(1, num_experts + 1).float() ** 1.2
        probs = probs[torch.randperm(num_experts)]
    ids = torch.multinomial(probs.expand(num_tokens, -1), top_k, replacement=False)
    weights = torch.softmax(torch.randn(num_tokens, top_k), dim=-1)
    return ids.to(device), weights.to(device)


def hf_module(shape: str, num_experts: int, dtype, device, implementation: str):
    """The Hugging Face experts module for the shape (Switch's per-expert ModuleDict, or Mixtral's stacked experts)
    with random weights, plus our view of the same weights."""
    hidden, ffn, top_k, gated, activation = SHAPES[shape]
    if gated:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=num_experts,
                               num_experts_per_tok=top_k)
        config._experts_implementation = implementation
        module = MixtralExperts(config)
        with torch.no_grad():
            module.gate_up_proj.normal_(0, hidden ** -0.5)
            module.down_proj.normal_(0, ffn ** -0.5)
        module = module.to(device=device, dtype=dtype)
        from engine.families.stacked import stacked_expert_weights

        return module, stacked_expert_weights(module, activation)
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersExperts

    config = SwitchTransformersConfig(d_model=hidden, d_ff=ffn, num_experts=num_experts, dense_act_fn=activation)
    module = SwitchTransformersExperts(config).to(device=device, dtype=dtype)
    weights = ExpertWeights(torch.stack([module[f"expert_{i}"].wi.weight for i in range(num_experts)]),
                            torch.stack([module[f"expert_{i}"].wo.weight for i in range(num_experts)]), None, activation)
    return module, weights


def hf_call(module, shape, hidden_states, ids, weights):
    if SHAPES[shape][3]:
        return lambda: module(hidden_states, ids, weights)
    one_hot = torch.nn.functional.one_hot(ids[:, :1], module.num_experts)  # (T, 1, E) as Switch's router gives
    return lambda: module(hidden_states, one_hot, weights[:, :1])


def time_all(fns: dict, device, repeats: int) -> dict:
    """Seconds per call of each function: the best of `repeats` rounds, interleaved, timed by CUDA events."""
    with torch.no_grad():
        return best_seconds(fns, device, repeats, warmup=2, once=event_seconds)  # warm-up: compilation, caches


def roofline_seconds(shape, num_tokens, num_experts, ids, dtype, device_name):
    hidden, ffn, top_k, gated, _ = SHAPES[shape]
    matrices = 3 if gated else 2
    flops = 2 * num_tokens * top_k * hidden * ffn * matrices
    experts_hit = int(torch.unique(ids).numel())
    element = torch.finfo(dtype).bits // 8
    traffic = experts_hit * matrices * hidden * ffn * element + 2 * num_tokens * hidden * element
    peak = next((p for key, p in PEAKS.items() if key in device_name), None)
    if peak is None:
        return flops, None
    return flops, max(flops / peak[0], traffic / peak[1])


def implementations(device, shape):
    impls = ["hf_eager"]
    if SHAPES[shape][3]:
        impls.append("hf_grouped_mm")  # transformers' grouped_mm exists only for stacked (ExpertsInterface) experts
    impls.append("tessera_torch")
    if device.type == "cuda" and triton_available(device):
        impls.append("tessera_triton")
    return impls


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    torch.manual_seed(0)
    for shape in args.shapes:
        hidden, ffn, top_k, _, _ = SHAPES[shape]
        expert_counts = args.experts if shape.startswith("switch") else [8]
        for num_experts in expert_counts:
            modules = {impl: hf_module(shape, num_experts, dtype, device, impl.removeprefix("hf_"))
                       for impl in ("hf_eager", "hf_grouped_mm") if impl in implementations(device, shape)}
            module, weights = modules["hf_eager"]
            for impl in modules:  # every implementation computes with the very same weights
                if impl != "hf_eager":
                    modules[impl][0].load_state_dict(module.state_dict())
            for skew in args.routing:
                for num_tokens in args.tokens:
                    x = torch.randn(num_tokens, hidden, device=device, dtype=dtype)
                    ids, topk_weights = routing(num_tokens, num_experts, top_k, skew, device)
                    flops, bound = roofline_seconds(shape, num_tokens, num_experts, ids, dtype, device_name)
                    fns = {}
                    for impl in implementations(device, shape):
                        if impl.startswith("hf_"):
                            fns[impl] = hf_call(modules[impl][0], shape, x, ids, topk_weights.to(dtype))
                        else:
                            backend = impl.removeprefix("tessera_")
                            fns[impl] = (lambda b=backend: run_experts(x, ids, topk_weights, weights, b))
                    times = time_all(fns, device, args.repeats)
                    row = dict(shape=shape, experts=num_experts, top_k=top_k, tokens=num_tokens, routing=skew,
                               seconds=times, speedup_vs_hf_eager={k: times["hf_eager"] / v for k, v in times.items()})
                    if "hf_grouped_mm" in times:
                        row["speedup_vs_grouped_mm"] = {k: times["hf_grouped_mm"] / v for k, v in times.items()}
                    if device.type == "cuda":
                        row["tflops"] = {k: flops / v / 1e12 for k, v in times.items()}
                        if bound is not None:
                            row["roofline_pct"] = {k: 100 * bound / v for k, v in times.items()}
                    rows.append(row)
                    print_row(row)
    if args.decode_graphs:
        rows += decode_graph_rows(args, device, dtype)
    return dict(device=device_name, device_type=device.type, dtype=args.dtype, torch=torch.__version__,
                triton=_version("triton"), transformers=_version("transformers"), results=rows)


def mixtral_block(shape: str, dtype, device, backend: str):
    """A whole MoE block (router included) of the shape, on tessera's layer, with random weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from engine.families import FAMILIES

    hidden, ffn, top_k, _, _ = SHAPES[shape]
    config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=8,
                           num_experts_per_tok=top_k, router_jitter_noise=0.0)
    with torch.device(device):  # built on the device: initialising Mixtral's experts on the host takes long
        hf_block = MixtralSparseMoeBlock(config).to(dtype)
    with torch.no_grad():
        for param in hf_block.parameters():
            param.normal_(0, hidden ** -0.5)
    hf_block = hf_block.eval()
    return FAMILIES["mixtral"].convert(hf_block, config, backend, None)


def decode_graph_rows(args, device, dtype) -> list[dict]:
    """Per decode batch: one MoE block eager, and replayed from a CUDA graph (`engine.moe.graphs.GraphedLayer`).
    (MoEShard's overhead at one rank is `scripts/bench_moeshard.py --single-gpu-overhead`.)"""
    from engine.moe.graphs import GraphedLayer

    rows = []
    shape = "mixtral" if "mixtral" in args.shapes else "mixtral-small"
    block = mixtral_block(shape, dtype, device, "triton")
    for batch in args.decode_batches:
        x = torch.randn(batch, 1, SHAPES[shape][0], device=device, dtype=dtype)
        graphed = GraphedLayer(block, x)
        times = time_all({"eager": lambda: block(x), "graphed": lambda: graphed(x)}, device, args.repeats)
        row = dict(section="decode_graphs", shape=shape, batch=batch, seconds=times,
                   graph_speedup=times["eager"] / times["graphed"])
        rows.append(row)
        print(f"decode {shape:14} batch {batch:>3}  eager {times['eager'] * 1e3:8.3f} ms  graphed "
              f"{times['graphed'] * 1e3:8.3f} ms  ×{row['graph_speedup']:.2f}")
    return rows


def _version(package):
    try:
        return __import__(package).__version__
    except ImportError:
        return None


_HEADER_DONE = []


def print_row(row):
    if not _HEADER_DONE:
        print(f"{'shape':14} {'E':>4} {'tokens':>6} {'routing':8} {'impl':15} {'ms':>9} {'×eager':>7} "
              f"{'×grouped':>8} {'TFLOP/s':>8} {'%roof':>6}")
        _HEADER_DONE.append(True)
    for impl, seconds in row["seconds"].items():
        grouped = row.get("speedup_vs_grouped_mm", {}).get(impl)
        tflops = row.get("tflops", {}).get(impl)
        roof = row.get("roofline_pct", {}).get(impl)
        print(f"{row['shape']:14} {row['experts']:>4} {row['tokens']:>6} {row['routing']:8} {impl:15} "
              f"{seconds * 1e3:>9.3f} {row['speedup_vs_hf_eager'][impl]:>7.2f} "
              f"{'' if grouped is None else f'{grouped:.2f}':>8} {'' if tflops is None else f'{tflops:.1f}':>8} "
              f"{'' if roof is None else f'{roof:.0f}':>6}")


def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--shapes", type=lambda s: s.split(","),
                        default=["switch-base", "mixtral"] if cuda else ["switch-base", "mixtral-small"])
    parser.add_argument("--experts", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64, 128])
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")],
                        default=[16, 256, 4096, 32768] if cuda else [16, 256, 2048])
    parser.add_argument("--routing", type=lambda s: s.split(","), default=["uniform", "zipf"])
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--decode-graphs", action="store_true",
                        help="also a whole MoE block at decode batches: eager against a CUDA-graph replay")
    parser.add_argument("--decode-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = parser.parse_args(argv)
    for shape in args.shapes:
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    if args.decode_graphs and torch.device(args.device).type != "cuda":
        parser.error("--decode-graphs needs a CUDA device (CUDA graphs)")
    result = run(args)
    out = Path(args.out)
    name = f"moe_layer_{result['device_type']}"
    if result["device_type"] == "cuda":  # the GPU model is part of the name: results from several cards coexist
        name += "_" + "".join(c if c.isalnum() else "_" for c in result["device"]).strip("_").lower()
    write_json(out / f"{name}.json", result, indent=2)
    print(f"wrote {out / name}.json")


if __name__ == "__main__":
    main()

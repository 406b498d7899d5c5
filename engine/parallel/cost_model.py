"""The cost model behind `strategy="auto"`: per MoE layer and per forward pass, predict the time of MoEShard and
of dropless expert parallelism and run the cheaper one.

Inputs, all identical on every rank so every rank makes the same choice without talking:
- the layer's shape (E, k, H, F, gated, dtype) and the world size G;
- `rows`, the per-rank token count agreed for the pass;
- the previous pass's global token count per expert for this layer (gathered in the pass's one sync), which
  gives the routed pairs and the pairs landing on EP's busiest rank;
- coefficients measured once at start-up (`calibrate`) by running both layer paths, real collectives and
  kernels included, on this machine's links and GPUs, then max-reduced over ranks.

    t_moeshard = a_s + b_s · rows                       (G·rows gathered rows, equal work on every rank)
    t_ep       = a_e + b_e · pairs / G + c_e · busiest  (the busiest owner computes and receives `busiest`)

`a` holds fixed costs (collective latency, launches), `b_s` MoEShard's G× larger
activation traffic plus its share of compute, `b_e` EP's local sorting and packing, `c_e` the hot rank's link and
kernel time. MoEShard's `rows` is the same whatever the skew; EP's `busiest` grows with it. Fitting on whole
paths rather than summing link and kernel estimates keeps the memory-bound glue (gathers, packing, sorting) in
the prediction, which on CPUs and at small batches is a large share of the time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.parallel.runtime import Dist
from foundation.timing import best_seconds


@dataclass(frozen=True)
class Linear:
    """`t(x) = fixed + x · slope` seconds."""

    fixed: float
    slope: float

    def __call__(self, x: float) -> float:
        return self.fixed + x * self.slope

    @staticmethod
    def fit(x1: float, t1: float, x2: float, t2: float) -> "Linear":
        slope = max((t2 - t1) / (x2 - x1), 0.0)
        return Linear(max(t1 - slope * x1, 0.0), slope)


@dataclass(frozen=True)
class LayerShape:
    num_experts: int
    top_k: int
    hidden: int
    ffn: int
    gated: bool
    dtype: torch.dtype
    routing_dtype: torch.dtype


@dataclass
class Prediction:
    moeshard: float
    ep: float

    @property
    def choice(self) -> str:
        return "moeshard" if self.moeshard <= self.ep else "ep"


@dataclass(frozen=True)
class CostModel:
    world: int
    moeshard: dict  # LayerShape → Linear over rows
    ep: dict  # LayerShape → (a, b, c)

    def predict(self, shape: LayerShape, rows: int, pairs: float, busiest: float) -> Prediction:
        a, b, c = self.ep[shape]
        return Prediction(self.moeshard[shape](rows), a + b * pairs / self.world + c * busiest)


def _inputs(shape: LayerShape, tokens: int, skewed: bool, device):
    g = torch.Generator(device="cpu").manual_seed(tokens)
    x = torch.randn(tokens, shape.hidden, generator=g).to(device=device, dtype=shape.dtype)
    if skewed:  # every pair on expert 0: EP's owner of expert 0 gets all G·tokens·k pairs
        ids = torch.zeros(tokens, shape.top_k, dtype=torch.int64)
    else:
        ids = torch.stack([torch.randperm(shape.num_experts, generator=g)[: shape.top_k] for _ in range(tokens)])
    weights = torch.full((tokens, shape.top_k), 1.0 / shape.top_k, dtype=shape.routing_dtype)
    return x, ids.to(device), weights.to(device)


# Fits already measured in this process, by (shape, world size, backend, device): calibration runs once.
_MEASURED: dict = {}


class CalibrationError(RuntimeError):
    """`auto`'s start-up measurement cannot run here; raised on every rank alike."""


def probe_kernels(dist: Dist, layers: dict, backend: str, token_sizes) -> None:
    """Run every expert computation calibration will make, at its exact shapes, on this rank alone (no
    collectives), then agree across ranks on whether all succeeded. A kernel that fails to launch (shared
    memory, registers, compilation) makes every rank raise here, the failing one naming kernel, configuration
    and device, instead of one rank dying inside a collective while the others wait for it."""
    from engine.moe.experts import run_experts
    from engine.moe.launch_errors import explain_launch_failure
    from engine.parallel.expert_parallel import ExpertOwners, dropless_bounds

    failure = None
    try:
        for shape, (ffn_part, expert_part) in layers.items():
            owners = ExpertOwners(shape.num_experts, dist.size, dist.device)
            for tokens in token_sizes:
                x, ids, w = _inputs(shape, dist.size * tokens, False, dist.device)
                run_experts(x, ids, w, ffn_part, backend, out_dtype=shape.dtype)  # MoEShard's gathered rows
                received = dist.size * dropless_bounds(owners, tokens, shape.top_k)[dist.rank]
                g = torch.Generator(device="cpu").manual_seed(received)
                x_ep = torch.randn(received, shape.hidden, generator=g).to(device=dist.device, dtype=shape.dtype)
                local = torch.randint(0, max(expert_part.num_experts, 1), (received, 1), generator=g)
                run_experts(x_ep, local.to(dist.device), None, expert_part, backend)  # EP's received chunk
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)  # launch failures surface here at the latest
    except Exception as err:  # noqa: BLE001 - every failure must reach the agreement below, or the others hang
        failure = explain_launch_failure(err, dist.device, f"auto's calibration at {token_sizes} tokens per rank")
    failed = torch.zeros(dist.size, dtype=torch.int64, device=dist.device)
    failed[dist.rank] = int(failure is not None)
    failed_ranks = [r for r, f in enumerate(dist.all_reduce_max(failed).tolist()) if f]
    if failure is not None:
        raise CalibrationError(f"rank {dist.rank}: {failure} (a smaller `calibration_tokens` keeps auto's start-up "
                               "within what the kernels accept)") from failure
    if failed_ranks:
        raise CalibrationError(f"auto's calibration failed on rank(s) {failed_ranks} (their errors name the kernel); "
                               f"rank {dist.rank} stops too rather than wait for them")


def calibrate(dist: Dist, layers: dict, backend: str, *, token_sizes=(1024, 16384), repeats: int = 5) -> CostModel:
    """Measure once per process. `layers` maps each distinct `LayerShape` to this rank's (ffn part, experts
    part) weights. Every rank runs the same calls in the same order (they are collectives); the fitted numbers
    are max-reduced so every rank holds the same model. The kernels are probed first (`probe_kernels`)."""
    context = (dist.size, backend, str(dist.device))
    todo = {shape: parts for shape, parts in layers.items() if (shape, *context) not in _MEASURED}
    if todo:
        probe_kernels(dist, todo, backend, token_sizes)
        _MEASURED.update(_measure(dist, todo, backend, token_sizes, repeats, context))
    return CostModel(dist.size, {s: _MEASURED[(s, *context)][0] for s in layers},
                     {s: _MEASURED[(s, *context)][1] for s in layers})


def _measure(dist: Dist, layers: dict, backend: str, token_sizes, repeats: int, context) -> dict:
    from engine.parallel.expert_parallel import ExpertOwners, ep_dropless_forward
    from engine.parallel.moeshard import moeshard_forward

    small, large = token_sizes
    numbers, keys = [], list(layers)
    for shape in keys:
        ffn_part, expert_part = layers[shape]
        owners = ExpertOwners(shape.num_experts, dist.size, dist.device)

        def paths(tokens):
            """MoEShard, EP with even routing, EP with every pair on one expert, at `tokens` per rank."""
            x, ids, w = _inputs(shape, tokens, False, dist.device)
            _, hot, _ = _inputs(shape, tokens, True, dist.device)
            return {"moeshard": lambda: moeshard_forward(dist, x, ids, w, tokens, ffn_part, backend),
                    "ep": lambda: ep_dropless_forward(dist, owners, x, ids, w, tokens, expert_part, backend),
                    "ep_hot": lambda: ep_dropless_forward(dist, owners, x, hot, w, tokens, expert_part, backend)}

        (shard_small, ep_small, _), (shard_large, ep_large, ep_hot) = (
            best_seconds(paths(n), dist.device, repeats).values() for n in (small, large))
        moeshard = Linear.fit(small, shard_small, large, shard_large)
        # Even routing: busiest ≈ pairs/G, so t = a + (b + c)·pairs/G; all on one expert: busiest = pairs.
        k, g = shape.top_k, dist.size
        even = Linear.fit(small * k, ep_small, large * k, ep_large)
        c = max((ep_hot - even(large * k)) / ((g - 1) * large * k), 0.0) if g > 1 else 0.0
        numbers += [moeshard.fixed, moeshard.slope, even.fixed, max(even.slope - c, 0.0), c]
    agreed = dist.all_reduce_max(torch.tensor(numbers, dtype=torch.float64, device=dist.device)).tolist()
    fits = {}
    for i, shape in enumerate(keys):
        a_s, b_s, a_e, b_e, c_e = agreed[5 * i : 5 * i + 5]
        fits[(shape, *context)] = (Linear(a_s, b_s), (a_e, b_e, c_e))
    return fits

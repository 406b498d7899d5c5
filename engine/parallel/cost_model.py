"""The cost model behind `strategy="auto"`: per MoE layer and per forward pass, predict the time of MoEShard and
of dropless expert parallelism and run the cheaper one.

Inputs, all identical on every rank so every rank makes the same choice without talking:
- the layer's shape (E, k, H, F, gated, dtype) and the world size G;
- `rows`, the per-rank token count agreed for the pass;
- the previous pass's global token count per expert for this layer (gathered in the pass's one sync), which
  gives the real number of routed pairs and EP's busiest rank;
- link and kernel speeds measured once at start-up (`calibrate`), then max-reduced over ranks.

Predictions (bytes are what the busiest rank receives):
    moeshard = t_gather(G·rows·row_bytes) + t_kernel_ffn(pairs) + t_reduce_scatter(G·rows·H·b)
    ep       = t_sync + 2·t_all_to_all(busiest·(G-1)/G·H·b) + t_kernel_experts(busiest)
with `pairs` all routed (token, expert) pairs, `busiest` the pairs that land on the most loaded owner, and each
collective `t(bytes) = latency + bytes / bandwidth`, each kernel `t(pairs) = fixed + pairs · per_pair`, fitted
at two sizes. MoEShard moves about G times the activation bytes of EP but never waits for a hot expert and
needs no per-layer sync; EP wins when activations are large, links slow and routing even.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.moe.experts import ExpertWeights, run_experts
from engine.parallel.runtime import Dist


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
class LinkModel:
    all_gather: Linear
    reduce_scatter: Linear
    all_to_all: Linear
    host_sync: float


@dataclass(frozen=True)
class LayerShape:
    num_experts: int
    top_k: int
    hidden: int
    ffn: int
    gated: bool
    dtype: torch.dtype
    routing_dtype: torch.dtype

    @property
    def act_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def gathered_row_bytes(self) -> int:
        """One token's packed row in MoEShard's all-gather (hidden, ids, weights, each 8-byte aligned)."""
        def aligned(n):
            return n + (-n % 8)
        w = torch.empty((), dtype=self.routing_dtype).element_size()
        return aligned(self.hidden * self.act_bytes) + 8 * self.top_k + aligned(w * self.top_k)


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
    link: LinkModel
    kernels: dict  # (shape, kind) → Linear over computed pairs

    def predict(self, shape: LayerShape, rows: int, pairs: float, busiest: float) -> Prediction:
        g, b = self.world, shape.act_bytes
        shard = (self.link.all_gather(g * rows * shape.gathered_row_bytes())
                 + self.kernels[(shape, "ffn")](pairs)
                 + self.link.reduce_scatter(g * rows * shape.hidden * b))
        moved = busiest * (g - 1) / g * (shape.hidden * b + 8)
        ep = self.link.host_sync + 2 * self.link.all_to_all(moved) + self.kernels[(shape, "experts")](busiest)
        return Prediction(shard, ep)


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _calibrate_link(dist: Dist, small: int, large: int, repeats: int) -> LinkModel:
    """Each collective at two sizes; x axis: bytes a rank receives."""
    def fit(make, op):
        times = []
        for n in (small, large):
            x = make(n)
            times.append(_timed(lambda: op(x), dist.device, repeats))
        return Linear.fit((dist.size - 1) * small, times[0], (dist.size - 1) * large, times[1])

    def zeros(numel, dtype=torch.uint8):
        return torch.zeros(numel, dtype=dtype, device=dist.device)

    gather = fit(lambda n: zeros(n), dist.all_gather)
    reduce_scatter = fit(lambda n: zeros(dist.size * n // 4, torch.float32), dist.reduce_scatter)
    all_to_all = fit(lambda n: zeros(dist.size * n), dist.all_to_all)
    flag = zeros(dist.size, torch.int64)
    sync = _timed(lambda: dist.all_to_all(flag).cpu(), dist.device, repeats)
    return LinkModel(gather, reduce_scatter, all_to_all, sync)


def _calibrate_kernel(part: ExpertWeights, top_k: int, backend: str, sizes: tuple[int, int], repeats: int) -> Linear:
    device = part.w1.device
    times = []
    generator = torch.Generator(device="cpu").manual_seed(0)
    for pairs in sizes:
        tokens = max(pairs // top_k, 1)
        x = torch.randn(tokens, part.hidden_size, generator=generator).to(device=device, dtype=part.w1.dtype)
        ids = torch.randint(0, part.num_experts, (tokens, top_k), generator=generator).to(device)
        times.append(_timed(lambda: run_experts(x, ids, None, part, backend), device, repeats))
    return Linear.fit(sizes[0], times[0], sizes[1], times[1])


def calibrate(dist: Dist, layers: dict, backend: str, *, pair_sizes=(256, 4096), bytes_sizes=(1 << 14, 1 << 22),
              repeats: int = 3) -> CostModel:
    """Measure once at start-up. `layers` maps each distinct `LayerShape` to this rank's (ffn part, experts part)
    weights. Every number is max-reduced over ranks, so every rank holds the same model."""
    link = _calibrate_link(dist, *bytes_sizes, repeats)
    kernels = {}
    for shape, (ffn_part, expert_part) in layers.items():
        kernels[(shape, "ffn")] = _calibrate_kernel(ffn_part, shape.top_k, backend, pair_sizes, repeats)
        kernels[(shape, "experts")] = _calibrate_kernel(expert_part, shape.top_k, backend, pair_sizes, repeats)
    keys = list(kernels)
    numbers = [link.all_gather.fixed, link.all_gather.slope, link.reduce_scatter.fixed, link.reduce_scatter.slope,
               link.all_to_all.fixed, link.all_to_all.slope, link.host_sync]
    numbers += [v for k in keys for v in (kernels[k].fixed, kernels[k].slope)]
    agreed = dist.all_reduce_max(torch.tensor(numbers, dtype=torch.float64, device=dist.device)).tolist()
    link = LinkModel(Linear(*agreed[0:2]), Linear(*agreed[2:4]), Linear(*agreed[4:6]), agreed[6])
    kernels = {k: Linear(agreed[7 + 2 * i], agreed[8 + 2 * i]) for i, k in enumerate(keys)}
    return CostModel(dist.size, link, kernels)

"""Turn a patched model into its distributed form on this rank: which part of the experts each block keeps, and
which executor runs it. Attention, embeddings, routers and dense layers stay whole on every rank (data-parallel
attention: each rank runs its own batch through them).

Strategies: `moeshard` (FFN slice of every expert), `ep` (whole experts, dropless), `ep-capacity` (whole
experts, DeepSpeed capacity factor), `auto` (both parts, cost model per layer and pass), `single` (unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine.families import patch_moe
from engine.moe.patch import moe_blocks
from engine.parallel.auto import AutoExecutor
from engine.parallel.cost_model import CostModel, LayerShape, calibrate
from engine.parallel.expert_parallel import ExpertParallelExecutor
from engine.parallel.layout import ShardedExperts, drop_full_experts, shard_from, shard_like
from engine.parallel.moeshard import MoEShardExecutor
from engine.parallel.pass_sync import PassSync, attach_hf, stream_of
from engine.parallel.runtime import Dist, split_range
from engine.parallel.stats import ExchangeStats

STRATEGIES = ("single", "moeshard", "ep", "ep-capacity", "auto")
_PART_KINDS = {"moeshard": ("ffn",), "ep": ("experts",), "ep-capacity": ("experts",), "auto": ("ffn", "experts")}
_PART_ATTRIBUTE = {"ffn": "moeshard_part", "experts": "ep_part"}


@dataclass
class ParallelState:
    """What `apply_strategy` installed, kept on the model as `model.tessera_parallel`."""

    strategy: str
    dist: Dist
    sync: PassSync
    stats: ExchangeStats | None
    cost_model: CostModel | None = None
    executors: dict = field(default_factory=dict)
    loaded_bytes: dict | None = None  # set by rank-local loading: bytes read, {"dense": .., "experts": ..}
    reads: list | None = None  # and every read, for checks


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    return strategy


def plan_parts(model: nn.Module, strategy: str, dist: Dist, *, meta: bool) -> list[tuple[str, ShardedExperts]]:
    """Give every MoE block this rank's part(s) and drop its full experts. With `meta`, the parts are empty
    meta tensors for the loader to fill; otherwise they are copied from the weights in memory."""
    parts = []
    for name, block in moe_blocks(model):
        full = block.expert_weights()
        for kind in _PART_KINDS[strategy]:
            total = full.ffn_width if kind == "ffn" else full.num_experts
            start, stop = split_range(total, dist.size, dist.rank)
            part = shard_like(block, kind, start, stop) if meta else shard_from(block, kind, start, stop)
            setattr(block, _PART_ATTRIBUTE[kind], part)
            parts.append((f"{name}.{_PART_ATTRIBUTE[kind]}", part))
        drop_full_experts(block)
    return parts


def layer_shape(block) -> LayerShape:
    weights = block.moeshard_part.weights()
    spec = block.spec
    dtype = weights.w1.dtype
    routing = torch.float32 if spec.kind == "softmax_topk" and spec.weights_in_fp32 else dtype
    return LayerShape(spec.num_experts, spec.top_k, weights.hidden_size, block.moeshard_part.ffn_width,
                      weights.w3 is not None, dtype, routing)


def _first_tensor_rows(args, kwargs) -> dict:
    x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    return {"tokens": x.numel() // x.shape[-1]}


def install_executors(model: nn.Module, strategy: str, dist: Dist, *, capacity_factor: float = 1.0,
                      min_capacity: int = 4, stats: bool = False,
                      calibration_tokens: tuple[int, int] = (1024, 16384)) -> ParallelState:
    """Hook the pass synchronisation and give every MoE block its strategy's executor. Models without a
    Hugging Face config (e.g. a bare layer stack) count tokens from their first input `(..., H)`."""
    counters = ExchangeStats() if stats else None
    sync = PassSync(dist, counters)
    blocks = moe_blocks(model)
    streams = {stream_of(name, model) for name, _ in blocks}
    if hasattr(model, "config"):
        attach_hf(sync, model, streams)
    else:
        sync.attach(model, _first_tensor_rows)
    state = ParallelState(strategy, dist, sync, counters)
    if strategy == "auto":
        shapes = {}
        for _, block in blocks:
            shapes.setdefault(layer_shape(block), (block.moeshard_part.weights(), block.ep_part.weights()))
        state.cost_model = calibrate(dist, shapes, blocks[0][1].backend, token_sizes=calibration_tokens)
    for name, block in blocks:
        stream = stream_of(name, model)
        if strategy == "moeshard":
            executor = MoEShardExecutor(dist, sync, stream, state.stats)
        elif strategy == "auto":
            executor = AutoExecutor(dist, sync, stream, layer_shape(block), state.cost_model, state.stats)
        else:
            executor = ExpertParallelExecutor(dist, sync, stream, block.spec.num_experts,
                                              capacity_factor if strategy == "ep-capacity" else None,
                                              min_capacity, state.stats)
        block.executor = executor
        state.executors[name] = executor
    model.tessera_parallel = state
    return state


def apply_strategy(model: nn.Module, strategy: str, group=None, *, capacity_factor: float = 1.0,
                   min_capacity: int = 4, stats: bool = False, backend: str | None = None,
                   calibration_tokens: tuple[int, int] = (1024, 16384)) -> nn.Module:
    """Distribute a model that every rank holds whole in memory (patched by `patch_moe`, or patched here with
    `backend`): keep this rank's expert part, free the rest, install the executors. Returns the model.

    `capacity_factor`/`min_capacity` apply to `ep-capacity` (DeepSpeed's defaults: 1.0 and 4). `stats` keeps
    byte/row/drop counters in `model.tessera_parallel.stats`. `calibration_tokens`: the two per-rank token
    counts at which `auto` measures both paths at start-up (pick sizes near the batches you will run).
    """
    check_strategy(strategy)
    if not moe_blocks(model):
        patch_moe(model, backend=backend)
    if strategy == "single":
        return model
    dist = Dist.current(group)
    plan_parts(model, strategy, dist, meta=False)
    install_executors(model, strategy, dist, capacity_factor=capacity_factor, min_capacity=min_capacity,
                      stats=stats, calibration_tokens=calibration_tokens)
    return model

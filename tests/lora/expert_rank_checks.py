"""What each gloo rank runs in test_expert_lora_ranks.py: expert LoRA under every distributed strategy against
the same rows on one process (and PEFT), on Mixtral and Qwen3-MoE. Rank functions return plain values."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from lora_helpers import peft_mixture_logits, tiny_mixtral, tiny_qwen3_moe

BUILDS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe}
# Rank 0 fills its cache a, b, d; rank 1 fills c, b, d, e: a slot holds different adapters on the two ranks.
# Ranks 4 to 16, adapters with and without expert parameters (d: attention only, e: down_proj only).
MIXES = {0: [{"a": 1.0}, {"b": 0.6, "a": 0.4}, {}, {"d": 1.0}],
         1: [{"c": 1.0}, {"b": 0.5, "c": 0.3, "d": 0.2}, {"e": 1.0}]}
SHAPES = {0: (4, 5), 1: (3, 7)}  # every rank's token count differs
SMALL_CALIBRATION = (64, 512)


def rank_ids(rank: int) -> torch.Tensor:
    return torch.randint(3, 96, SHAPES[rank], generator=torch.Generator().manual_seed(50 + rank))


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out - reference).abs().max() / reference.abs().max()).item()


def distributed(family: str, strategy: str, folders: dict, backend: str, attach_first: bool = False,
                checkpoint: str | None = None, **options):
    """The family's tiny model under `strategy` with the adapters attached (after the strategy or before it),
    or loaded rank-locally from `checkpoint` by engine.load with the adapters."""
    import engine
    from engine.families import patch_moe
    from engine.lora import AdapterPool, attach_adapters
    from engine.parallel import apply_strategy

    if checkpoint is not None:  # saved from the same seeded model; the adapters name it by its hub-style name
        pool = AdapterPool(folders, base_model=BUILDS[family]().config._name_or_path)
        return engine.load(checkpoint, strategy=strategy, backend="torch", strategy_options={"stats": True},
                           adapters=pool, adapter_options={"backend": backend, **options})
    model = patch_moe(BUILDS[family](), backend="torch")
    if attach_first:
        lm = attach_adapters(model, folders, backend=backend, **options)
        apply_strategy(model, strategy, calibration_tokens=SMALL_CALIBRATION, capacity_factor=100.0, stats=True)
        return lm
    apply_strategy(model, strategy, calibration_tokens=SMALL_CALIBRATION, capacity_factor=100.0, stats=True)
    return attach_adapters(model, folders, backend=backend, **options)


def force_auto(lm, choice: str, world: int) -> None:
    from engine.parallel.cost_model import CostModel, Linear

    shard_cost, ep_cost = (1.0, 0.0) if choice == "ep" else (0.0, 1.0)
    for ex in lm.model.tessera_parallel.executors.values():
        ex.model = CostModel(world, {ex.shape: Linear(shard_cost, 0.0)}, {ex.shape: (ep_cost, 0.0, 0.0)})


def expert_lora_session(rank: int, world: int, family_folders: dict, scratch: str) -> dict:
    """→ {"single": {family: error vs PEFT}, "runs": {(family, strategy, backend): (error vs one process,
    host synchronisations in the pass)}, "choices": ..., "idle_rank": ..., "budget": ...}"""
    from engine.lora import attach_adapters

    ids, mixes = rank_ids(rank), MIXES[rank]
    out = {"single": {}, "runs": {}, "choices": {}, "effect": {}, "seconds": {}, "bytes": {}}
    references = {}
    start = time.monotonic()
    for family, build in BUILDS.items():
        folders = family_folders[family]
        base = build()
        references[family] = attach_adapters(copy.deepcopy(base), folders, backend="torch")(
            input_ids=ids, adapter_weights=mixes).logits
        with torch.no_grad():  # how far the adapters move this rank's rows: the errors below must be far smaller
            out["effect"][family] = relative_error(base(input_ids=ids).logits, references[family])
        if family == "qwen3_moe" or rank == 0:  # PEFT per row is slow: each family's rows once, split over ranks
            rescaled = Path(scratch) / f"{family}-rank{rank}"
            rescaled.mkdir()
            expected = torch.cat([peft_mixture_logits(base, mix, folders, rescaled, ids[r:r + 1])
                                  for r, mix in enumerate(mixes)])
            out["single"][family] = relative_error(references[family], expected)
    out["seconds"]["one process and PEFT"] = time.monotonic() - start
    runs = [("mixtral", s, "torch") for s in ("moeshard", "ep", "ep-capacity", "auto:moeshard", "auto:ep")]
    runs += [("qwen3_moe", "moeshard", "torch"), ("qwen3_moe", "ep", "torch"), ("qwen3_moe", "moeshard", "triton"),
             ("mixtral", "ep", "triton"), ("mixtral", "moeshard:first", "torch"), ("mixtral", "moeshard:unpacked", "torch"),
             ("mixtral", "moeshard:loaded", "torch"), ("mixtral", "ep:loaded", "torch")]
    for family, strategy, backend in runs:
        name, _, variant = strategy.partition(":")
        lm = distributed(family, name, family_folders[family], backend, attach_first=variant == "first",
                         checkpoint=str(Path(scratch) / "mixtral-checkpoint") if variant == "loaded" else None)
        if name == "auto":
            force_auto(lm, variant, world)
        counted = count_bytes(lm) if name != "auto" else None
        got = forward(lm, ids, mixes, unpacked=variant == "unpacked")
        out["runs"][(family, strategy, backend)] = (relative_error(got, references[family]),
                                                    lm.model.tessera_parallel.stats.host_syncs)
        if counted is not None:
            stats = lm.model.tessera_parallel.stats
            out["bytes"][(family, strategy, backend)] = ((counted.sent, counted.received),
                                                         (stats.bytes_sent, stats.bytes_received))
        if name == "auto":
            out["choices"][strategy] = sorted(lm.model.tessera_parallel.stats.choices)
    out["seconds"]["strategies"] = time.monotonic() - start - out["seconds"]["one process and PEFT"]
    out["generate"] = generate(rank, family_folders["qwen3_moe"])
    out["idle_rank"] = idle_rank(rank, family_folders["mixtral"], references["mixtral"])
    out["budget"] = over_budget(rank, family_folders["mixtral"])
    return out


class CountingDist:
    """A MoE layer's `Dist` that adds up the bytes its collectives send to and receive from the other ranks."""

    def __init__(self, inner):
        self.inner, self.sent, self.received = inner, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def all_gather(self, x):
        self._add(x.numel() * x.element_size(), self.inner.size - 1, self.inner.size - 1)
        return self.inner.all_gather(x)

    def reduce_scatter(self, x):
        self._add(x.numel() * x.element_size() // self.inner.size, self.inner.size - 1, self.inner.size - 1)
        return self.inner.reduce_scatter(x)

    def all_to_all(self, x, send_counts=None, recv_counts=None):
        even = [x.shape[0] // self.inner.size] * self.inner.size
        sends, receives, me = send_counts or even, recv_counts or even, self.inner.rank
        self._add(x[0].numel() * x.element_size() if x.shape[0] else 0, sum(sends) - sends[me],
                  sum(receives) - receives[me])
        return self.inner.all_to_all(x, send_counts, recv_counts)

    def _add(self, unit: int, sent: int, received: int) -> None:
        self.sent += unit * sent
        self.received += unit * received


def count_bytes(lm) -> CountingDist:
    """Every MoE executor of the model exchanges through one CountingDist (the pass's agreement does not)."""
    executors = list(lm.model.tessera_parallel.executors.values())
    counter = CountingDist(executors[0].dist)
    for executor in executors:
        executor.dist = counter
    return counter


def forward(lm, ids, mixes, unpacked: bool = False) -> torch.Tensor:
    """Logits; `unpacked`: MoEShard's large-batch path (hidden states gathered apart from the routing)."""
    from engine.parallel import moeshard

    limit = moeshard.PACK_LIMIT_BYTES
    moeshard.PACK_LIMIT_BYTES = 0 if unpacked else limit
    try:
        return lm(input_ids=ids, adapter_weights=mixes).logits
    finally:
        moeshard.PACK_LIMIT_BYTES = limit


def generate(rank: int, folders: dict) -> bool:
    """Greedy generation (one agreement per step, the other ranks' adapters pinned for the whole call) gives
    the tokens one process gives. Every rank runs the same number of steps (min = max new tokens)."""
    from engine.lora import attach_adapters

    ids, mixes = rank_ids(rank), MIXES[rank]
    options = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    single = attach_adapters(tiny_qwen3_moe(), folders, backend="torch").generate(ids, adapter_weights=mixes,
                                                                                  **options)
    lm = distributed("qwen3_moe", "moeshard", folders, "torch")
    return bool(torch.equal(lm.generate(ids, adapter_weights=mixes, **options), single))


def idle_rank(rank: int, folders: dict, reference: torch.Tensor) -> list[float]:
    """Calls after the first on the same model where rank 1 runs the base model, then only attention adapters
    with more adapters per row than rank 0 mixes: rank 0's rows still get their expert adapters (rank 1
    computes its part of them). → relative errors against one process"""
    ids = rank_ids(rank)
    lm = distributed("mixtral", "moeshard", folders, "torch")
    lm(input_ids=ids, adapter_weights=MIXES[rank])
    if rank == 0:
        return [relative_error(lm(input_ids=ids, adapter_weights=MIXES[0]).logits, reference),
                relative_error(lm(input_ids=ids, adapter_weights=[{"a": 1.0}] * 4).logits,
                               _single(folders, ids, [{"a": 1.0}] * 4))]
    with torch.no_grad():
        base = tiny_mixtral()(input_ids=ids).logits
    dense = [{"d": 0.5, "f": 0.5}] * 3
    return [relative_error(lm(input_ids=ids).logits, base),
            relative_error(lm(input_ids=ids, adapter_weights=dense).logits, _single(folders, ids, dense))]


def _single(folders: dict, ids, mixes) -> torch.Tensor:
    from engine.lora import attach_adapters

    return attach_adapters(tiny_mixtral(), folders, backend="torch")(input_ids=ids, adapter_weights=mixes).logits


def over_budget(rank: int, folders: dict):
    """A cache of two adapters per rank: each rank's batch fits, the union of the ranks' (a, b, c) does not. Every
    rank refuses the pass the same way; a later pass that fits runs. → (error message, relative error after)"""
    from engine.lora import AdapterPool, CacheFullError
    from engine.lora.cache import AdapterCache

    per_adapter = AdapterCache.adapter_bytes(AdapterPool(folders), torch.float32)
    lm = distributed("mixtral", "ep", folders, "torch", cache_bytes=2 * per_adapter)
    ids = rank_ids(rank)
    mixes = [{"a": 1.0}, {"b": 1.0}, {}, {}] if rank == 0 else [{"c": 1.0}, {"b": 1.0}, {}]
    try:
        lm(input_ids=ids, adapter_weights=mixes)
        message = None
    except CacheFullError as err:
        message = str(err)
    fits = [{"b": 1.0}] * ids.shape[0]
    return message, relative_error(lm(input_ids=ids, adapter_weights=fits).logits, _single(folders, ids, fits))

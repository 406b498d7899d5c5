"""`strategy="auto"`: each MoE layer holds both an FFN slice of every expert and its own whole experts, and on
every call runs whichever of MoEShard and dropless EP the cost model predicts faster.

The choice is made on the host from numbers every rank shares (agreed token count, last pass's global expert
counts, the calibrated model), so all ranks pick the same path without exchanging anything extra. The price of
choosing per pass is memory: expert weights take 2/G of the model per rank instead of 1/G.
"""
from __future__ import annotations

import torch

from engine.parallel.cost_model import CostModel, LayerShape
from engine.parallel.expert_parallel import ExpertOwners, ep_dropless_forward
from engine.parallel.layout import part_lora
from engine.parallel.moeshard import moeshard_forward
from engine.parallel.pass_sync import PassSync
from engine.parallel.runtime import Dist
from engine.parallel.stats import ExchangeStats


def expert_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs per expert `(E,)` int64, on the device (bincount would read its output size back to the host)."""
    ids = topk_ids.reshape(-1).to(torch.int64)
    slot = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    return counts.index_add_(0, slot, torch.ones_like(slot))[:num_experts]


class AutoExecutor:
    name = "auto"

    def __init__(self, dist: Dist, sync: PassSync, stream: str, shape: LayerShape, model: CostModel,
                 stats: ExchangeStats | None = None):
        self.dist, self.sync, self.stream, self.shape, self.model, self.stats = dist, sync, stream, shape, model, stats
        self.owners = ExpertOwners(shape.num_experts, dist.size, dist.device)
        self._counts = torch.zeros(shape.num_experts, dtype=torch.int64, device=dist.device)
        self._rows = 0  # rows of the call that counted `_counts`
        self._last: tuple[list[int], int] | None = None  # (global pairs per expert, rows) of the previous call
        sync.add_listener(self)

    # pass_sync listener: our device-side expert counts ride along in the pass's one gather.
    def history(self) -> torch.Tensor:
        return self._counts

    def receive(self, gathered: torch.Tensor) -> None:
        total = gathered.sum(0).tolist()
        self._last = (total, self._rows) if sum(total) > 0 else None

    def _load(self, rows: int) -> tuple[float, float]:
        """(all routed pairs, pairs on EP's busiest rank) expected for this call."""
        k, g = self.shape.top_k, self.dist.size
        if self._last is None or self._last[1] == 0:
            return float(g * rows * k), float(rows * k)  # nothing seen yet: full batches, even routing
        counts, last_rows = self._last
        scale = rows / last_rows
        busiest = max(sum(counts[lo:hi]) for lo, hi in self.owners.ranges)
        return sum(counts) * scale, busiest * scale

    def __call__(self, block, hidden, topk_ids, topk_weights):
        rows = self.sync.tokens(self.stream, hidden.shape[0])
        prediction = self.model.predict(self.shape, rows, *self._load(rows))
        choice = prediction.choice
        self._counts, self._rows = expert_counts(topk_ids, self.shape.num_experts), rows
        if self.stats is not None:
            self.stats.choices[choice] = self.stats.choices.get(choice, 0) + 1
        if choice == "moeshard":
            return moeshard_forward(self.dist, hidden, topk_ids, topk_weights, rows, block.moeshard_part.weights(),
                                    block.backend, self.stats, part_lora(block, block.moeshard_part))
        return ep_dropless_forward(self.dist, self.owners, hidden, topk_ids, topk_weights, rows,
                                   block.ep_part.weights(), block.backend, self.stats, part_lora(block, block.ep_part))

"""Expert parallelism, the DeepSpeed-MoE baseline: rank r owns whole experts `[start_r, stop_r)` (E/G each,
uneven remainders allowed), tokens travel to their experts' owners by all-to-all and come back the same way.

Two variants:

- `ep-capacity` (DeepSpeed's `drop_tokens=True`): every expert gets `capacity = max(ceil(k · rows / E · cf),
  min_capacity)` slots per rank, `rows` being the token count agreed for the pass (DeepSpeed uses the local
  batch, equal on all ranks there). Slots are claimed in DeepSpeed's priority order: all first choices in token
  order, then all second choices (top-2 gating), and so on; a choice past the capacity is dropped and contributes
  zero (its token keeps the other choices and the residual). The buffer `(E, capacity, H)` is sent whole and
  computed whole, padding included, as DeepSpeed does; sizes are fixed, so there is no host synchronisation.
  DeepSpeed's optional random token selection (`use_rts`) is not reproduced: priority is token order.
- `ep` (dropless): every routed pair reaches its owner, as with MegaBlocks/DeepSpeed's `drop_tokens=False`. They
  size a variable all-to-all from this layer's counts, a host synchronisation per layer; here each destination
  gets a chunk sized by the most pairs it could get (`dropless_bounds`), so sizes come from the pass's agreed
  token count and the layer never waits on the host, at the cost of sending padding.

Routing weights are the family router's; EP only decides which pairs are computed.
"""
from __future__ import annotations

import math

import torch

from engine.moe.experts import ExpertWeights, run_experts
from engine.parallel.layout import part_lora
from engine.parallel.pass_sync import PassSync
from engine.parallel.rows import pack_rows, unpack_rows
from engine.parallel.runtime import Dist, split_range
from engine.parallel.stats import ExchangeStats, maybe_timing


class ExpertOwners:
    """Which rank owns which expert, as host ranges and as a device lookup table (id E → rank G: nowhere)."""

    def __init__(self, num_experts: int, world: int, device):
        self.num_experts, self.world = num_experts, world
        self.ranges = [split_range(num_experts, world, r) for r in range(world)]
        owner = torch.full((num_experts + 1,), world, dtype=torch.int64)
        start = torch.zeros(world + 1, dtype=torch.int64)
        for r, (lo, hi) in enumerate(self.ranges):
            owner[lo:hi] = r
            start[r] = lo
        self.owner, self.start = owner.to(device), start.to(device)
        self.sizes = torch.tensor([hi - lo for lo, hi in self.ranges]).to(device)  # experts per owner

    def chunk_starts(self, top_k: int, rows: int) -> torch.Tensor:
        """`(G + 1,)` offsets of each owner's chunk of `dropless_bounds`, computed on the device (a tensor
        built from host values per call would be a synchronous copy on CUDA)."""
        chunks = torch.cumsum(self.sizes.clamp(max=top_k) * rows, 0)
        return torch.nn.functional.pad(chunks, (1, 0))

    def owner_of(self, flat_ids: torch.Tensor) -> torch.Tensor:
        valid = (flat_ids >= 0) & (flat_ids < self.num_experts)
        return self.owner[torch.where(valid, flat_ids, self.num_experts)]


def one_hot_on_device(ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`F.one_hot` checks its input's range on the host on CPU (an `.item()`); a comparison never reads it.
    Ids at or past `num_classes` give an all-zero row."""
    return (ids[..., None] == torch.arange(num_classes, device=ids.device)).to(torch.int64)


def deepspeed_capacity(rows: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed-MoE's expert capacity per rank: `ceil(k · tokens / E · capacity_factor)`, at least
    `min_capacity` (top-1 and top-2 gating use k = 1 and 2)."""
    return max(math.ceil(top_k * rows / num_experts * capacity_factor), min_capacity)


def capacity_slots(topk_ids: torch.Tensor, num_experts: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSpeed's priority: choice j of every token ranks after all choices < j, then by token order.
    Returns each pair's slot `expert * capacity + location` (T, k) and whether it is kept (T, k)."""
    ids = topk_ids.to(torch.int64)
    valid = (ids >= 0) & (ids < num_experts)
    one_hot = one_hot_on_device(torch.where(valid, ids, num_experts), num_experts)
    # (T, k, E) → choice-major order (k, T, E); cumulative count gives each pair's location in its expert.
    by_choice = one_hot.transpose(0, 1).reshape(-1, num_experts)
    locations = (torch.cumsum(by_choice, dim=0) - 1).view(ids.shape[1], ids.shape[0], num_experts).transpose(0, 1)
    location = locations.gather(2, torch.where(valid, ids, 0)[..., None]).squeeze(2)
    kept = valid & (location < capacity)
    return ids * capacity + location, kept


def ep_capacity_forward(dist: Dist, owners: ExpertOwners, hidden, topk_ids, topk_weights, rows: int,
                        part: ExpertWeights, backend: str, capacity_factor: float, min_capacity: int,
                        stats: ExchangeStats | None = None, lora=None) -> torch.Tensor:
    """`lora` (`layout.part_lora`): expert adapters, whose per-token slots and weights travel with the pairs."""
    num_tokens, hidden_size = hidden.shape
    num_experts = owners.num_experts
    capacity = deepspeed_capacity(rows, num_experts, topk_ids.shape[1], capacity_factor, min_capacity)
    slot, kept = capacity_slots(topk_ids, num_experts, capacity)
    token = torch.arange(num_tokens, device=hidden.device)[:, None].expand_as(slot)
    # Dispatch buffer (E·capacity, H), expert-major, so each owner's slots are one contiguous chunk; dropped
    # pairs go to one extra row that is never sent (no boolean mask: its size would be read back to the host).
    destination = torch.where(kept, slot, num_experts * capacity).reshape(-1)
    buffer = hidden.new_zeros(num_experts * capacity + 1, hidden_size)
    buffer[destination] = hidden[token.reshape(-1)]
    splits = [(hi - lo) * capacity for lo, hi in owners.ranges]
    recv = [splits[dist.rank]] * dist.size
    adapters = None if lora is None else lora.routing(num_tokens)
    dispatch_row_bytes = hidden_size * hidden.element_size()
    if adapters is None:
        received = dist.all_to_all(buffer[: num_experts * capacity], splits, recv)
    else:  # each slot row carries its token's adapters, in the same all-to-all
        sent = [_pair_rows(t, destination, token.reshape(-1), num_experts * capacity) for t in adapters]
        packed = pack_rows(buffer[: num_experts * capacity], *sent)
        dispatch_row_bytes = packed.shape[1]
        received, *arrived = unpack_rows(dist.all_to_all(packed, splits, recv),
                                         [(hidden_size, hidden.dtype), *((t.shape[1], t.dtype) for t in sent)])
        part = lora.attach(part, *arrived, _sources(recv[0], dist.size, hidden.device))
    local = part.num_experts
    local_ids = torch.arange(dist.size * local * capacity, device=hidden.device) // capacity % local
    with maybe_timing(stats, hidden.device):
        # The whole buffer, empty slots included: DeepSpeed computes its padding too.
        expert_out = run_experts(received, local_ids[:, None], None, part, backend)
    returned = dist.all_to_all(expert_out, [splits[dist.rank]] * dist.size, splits)
    pair_out = returned[torch.where(kept, slot, 0)] * (topk_weights * kept)[..., None]
    if stats is not None:
        others = sum(s for r, s in enumerate(splits) if r != dist.rank)  # slot rows this rank sends, and gets back
        mine_out = (dist.size - 1) * splits[dist.rank]  # slot rows it receives, and returns
        return_row_bytes = expert_out.shape[1] * expert_out.element_size()
        stats.calls += 1
        stats.bytes_sent += others * dispatch_row_bytes + mine_out * return_row_bytes
        stats.bytes_received += mine_out * dispatch_row_bytes + others * return_row_bytes
        stats.add_rows(received.shape[0])
        stats.add_dropped(((topk_ids >= 0) & (topk_ids < num_experts) & ~kept).sum())
    return pair_out.sum(1).to(hidden.dtype)


def dropless_bounds(owners: ExpertOwners, rows: int, top_k: int) -> list[int]:
    """Most pairs one rank can send to each owner: every one of `rows` tokens picks up to `min(k, E_r)` of the
    owner's experts (a token's choices are distinct). Known on the host from shapes alone."""
    return [rows * min(top_k, hi - lo) for lo, hi in owners.ranges]


def ep_dropless_forward(dist: Dist, owners: ExpertOwners, hidden, topk_ids, topk_weights, rows: int,
                        part: ExpertWeights, backend: str, stats: ExchangeStats | None = None,
                        lora=None) -> torch.Tensor:
    """Dropless EP without a host synchronisation: each destination gets a fixed-size chunk of
    `dropless_bounds` rows (padding carries expert id E, which every backend skips), so the all-to-all sizes
    come from the agreed `rows`, not from this layer's routing. The price is bandwidth: padding travels too
    (up to min(k, E_r)·G/k times the routed rows), which the cost model of `auto` measures. `lora`
    (`layout.part_lora`): expert adapters, whose per-token slots and weights travel with the pairs."""
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    num_experts = owners.num_experts
    flat = topk_ids.reshape(-1).to(torch.int64)
    dest = owners.owner_of(flat)  # G for pairs computed nowhere
    bounds = dropless_bounds(owners, rows, top_k)
    starts = owners.chunk_starts(top_k, rows)
    total = int(sum(bounds))
    # Each pair's place in its destination's chunk: its rank among this rank's pairs for that destination.
    one_hot = one_hot_on_device(dest, dist.size + 1)
    location = (torch.cumsum(one_hot, dim=0) - 1).gather(1, dest[:, None]).squeeze(1)
    slot = torch.where(dest < dist.size, starts[dest.clamp(max=dist.size - 1)] + location, total)  # total: dump row
    pair_token = torch.arange(num_tokens * top_k, device=hidden.device) // top_k
    send_x = hidden.new_zeros(total + 1, hidden_size)
    send_x[slot] = hidden[pair_token]
    send_ids = torch.full((total + 1,), num_experts, dtype=torch.int64, device=hidden.device)
    send_ids[slot] = flat - owners.start[dest.clamp(max=dist.size - 1)]
    adapters = None if lora is None else lora.routing(num_tokens)
    sent = [] if adapters is None else [_pair_rows(t, slot, pair_token, total) for t in adapters]
    packed = pack_rows(send_x[:total], send_ids[:total, None], *sent)
    recv = [bounds[dist.rank]] * dist.size
    arrived = dist.all_to_all(packed, bounds, recv)
    x, ids, *adapters_arrived = unpack_rows(arrived, [(hidden_size, hidden.dtype), (1, torch.int64),
                                                      *((t.shape[1], t.dtype) for t in sent)])
    if adapters_arrived:
        part = lora.attach(part, *adapters_arrived, _sources(recv[0], dist.size, hidden.device))
    with maybe_timing(stats, hidden.device):
        expert_out = run_experts(x, ids.contiguous(), None, part, backend)
    returned = dist.all_to_all(expert_out, recv, bounds)
    kept = (dest < dist.size).view(num_tokens, top_k)
    pair_out = returned[torch.where(kept.reshape(-1), slot, 0)].view(num_tokens, top_k, hidden_size)
    weighted = pair_out * (topk_weights * kept)[..., None]
    if stats is not None:
        me, row_out = dist.rank, hidden_size * returned.element_size()
        stats.calls += 1
        stats.bytes_sent += (total - bounds[me]) * packed.shape[1] + (sum(recv) - recv[me]) * row_out
        stats.bytes_received += (sum(recv) - recv[me]) * packed.shape[1] + (total - bounds[me]) * row_out
        stats.add_rows(((ids >= 0) & (ids < part.num_experts)).sum())
    return weighted.sum(1).to(hidden.dtype)


def _pair_rows(per_token: torch.Tensor, destination: torch.Tensor, pair_token: torch.Tensor,
               rows: int) -> torch.Tensor:
    """A per-token tensor (its expert adapters' slots or weights) laid out as the send buffer: row
    `destination[p]` gets pair p's token's row; rows no pair fills are empty (slot -1, weight 0)."""
    out = per_token.new_full((rows + 1, per_token.shape[1]), -1 if per_token.dtype == torch.int32 else 0)
    out[destination] = per_token[pair_token]
    return out[:rows]


def _sources(chunk: int, world: int, device) -> torch.Tensor:
    """The source rank of each received row: the all-to-all brings `chunk` rows from every rank, in rank order."""
    return torch.arange(world * chunk, device=device) // max(chunk, 1)


class ExpertParallelExecutor:
    """The executor a block runs under `ep` / `ep-capacity`; its experts live at `block.ep_part`."""

    def __init__(self, dist: Dist, sync: PassSync, stream: str, num_experts: int, capacity_factor: float | None,
                 min_capacity: int = 4, stats: ExchangeStats | None = None):
        self.dist, self.sync, self.stream, self.stats = dist, sync, stream, stats
        self.owners = ExpertOwners(num_experts, dist.size, dist.device)
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.name = "ep" if capacity_factor is None else "ep-capacity"

    def __call__(self, block, hidden, topk_ids, topk_weights):
        shard = block.ep_part
        part, lora = shard.weights(), part_lora(block, shard)
        rows = self.sync.tokens(self.stream, hidden.shape[0])
        if self.capacity_factor is None:
            return ep_dropless_forward(self.dist, self.owners, hidden, topk_ids, topk_weights, rows, part,
                                       block.backend, self.stats, lora)
        return ep_capacity_forward(self.dist, self.owners, hidden, topk_ids, topk_weights, rows, part,
                                   block.backend, self.capacity_factor, self.min_capacity, self.stats, lora)

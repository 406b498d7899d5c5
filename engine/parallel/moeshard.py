"""MoEShard: every rank holds FFN columns `[start, stop)` of every expert and computes them for every token.

Per MoE layer, with `rows` the token count agreed for this pass (`pass_sync`):
1. pad this rank's tokens to `rows`; padded rows get expert id `E`, which every backend skips;
2. all-gather hidden states, expert ids and routing weights: packed into one byte row per token (one collective)
   while the batch is small, as two collectives (hidden states gathered in place) once copying would cost more;
3. this rank's slice of all experts on all gathered tokens: one expert-backend call (one launch per GEMM);
4. one reduce-scatter of the partial outputs: each rank receives the sum over ranks for its own tokens.

Every rank computes the same rows against equally wide slices, so the work is balanced whatever the routing
skew, and nothing is dropped. No value is read back to the host inside the layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.moe.experts import ExpertWeights, run_experts
from engine.parallel.layout import part_lora
from engine.parallel.pass_sync import PassSync
from engine.parallel.rows import pack_rows, unpack_rows
from engine.parallel.runtime import Dist
from engine.parallel.stats import ExchangeStats, maybe_timing

# Below this many bytes of hidden states per rank, one packed all-gather (hidden, ids, weights) beats two
# collectives; above it, copying the hidden states into the packed buffer costs more than a collective's latency.
PACK_LIMIT_BYTES = 1 << 20


def moeshard_forward(dist: Dist, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     rows: int, part: ExpertWeights, backend: str, stats: ExchangeStats | None = None,
                     lora=None) -> torch.Tensor:
    """`hidden (T, H)` with `T <= rows` → this rank's `(T, H)` expert output, summed over all ranks' slices.
    `lora` (`layout.part_lora`): expert adapters, whose per-token slots and weights travel with the tokens."""
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    if rows == 0:  # every rank agreed there is nothing to do
        return hidden.new_zeros(num_tokens, hidden_size)
    pad = rows - num_tokens
    ids = topk_ids.to(torch.int64)
    adapters = () if lora is None else lora.routing(num_tokens) or ()  # (slots, weights) or nothing
    if pad:
        hidden = F.pad(hidden, (0, 0, 0, pad))
        ids = F.pad(ids, (0, 0, 0, pad), value=part.num_experts)
        topk_weights = F.pad(topk_weights, (0, 0, 0, pad))
        adapters = tuple(F.pad(t, (0, 0, 0, pad), value=-1 if t.dtype == torch.int32 else 0) for t in adapters)
    routing = [ids, topk_weights, *adapters]
    routing_specs = [(t.shape[1], t.dtype) for t in routing]
    if dist.size == 1:  # nothing to exchange, so nothing to pack
        x_all, (ids_all, w_all, *adapters_all), row_bytes = hidden, routing, 0
    elif hidden.numel() * hidden.element_size() <= PACK_LIMIT_BYTES:  # latency-bound: one collective
        packed = pack_rows(hidden, *routing)
        x_all, ids_all, w_all, *adapters_all = unpack_rows(dist.all_gather(packed),
                                                           [(hidden_size, hidden.dtype), *routing_specs])
        row_bytes = packed.shape[1]
    else:  # bandwidth-bound: gather the hidden states in place rather than copy them into a packed buffer
        packed = pack_rows(*routing)
        x_all = dist.all_gather(hidden)
        ids_all, w_all, *adapters_all = unpack_rows(dist.all_gather(packed), routing_specs)
        row_bytes = packed.shape[1] + hidden_size * hidden.element_size()
    if adapters_all:  # rows [r·rows, (r+1)·rows) came from rank r
        sources = torch.arange(dist.size * rows, device=hidden.device) // rows
        part = lora.attach(part, *adapters_all, sources)
    with maybe_timing(stats, hidden.device):
        partial = run_experts(x_all, ids_all.contiguous(), w_all, part, backend, out_dtype=hidden.dtype)
    out = dist.reduce_scatter(partial)
    if stats is not None:
        others = dist.size - 1
        stats.calls += 1
        moved = others * rows * (row_bytes + hidden_size * partial.element_size())
        stats.bytes_sent += moved
        stats.bytes_received += moved
        stats.add_rows(((ids_all >= 0) & (ids_all < part.num_experts)).sum())
    return out[:num_tokens]


class MoEShardExecutor:
    """The executor a block runs under `strategy="moeshard"`; its part lives at `block.moeshard_part`."""

    name = "moeshard"

    def __init__(self, dist: Dist, sync: PassSync, stream: str, stats: ExchangeStats | None = None):
        self.dist, self.sync, self.stream, self.stats = dist, sync, stream, stats

    def __call__(self, block, hidden, topk_ids, topk_weights):
        rows = self.sync.tokens(self.stream, hidden.shape[0])
        shard = block.moeshard_part
        return moeshard_forward(self.dist, hidden, topk_ids, topk_weights, rows, shard.weights(), block.backend,
                                self.stats, part_lora(block, shard))

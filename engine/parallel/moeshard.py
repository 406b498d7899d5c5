"""MoEShard: every rank holds FFN columns `[start, stop)` of every expert and computes them for every token.

Per MoE layer, with `rows` the token count agreed for this pass (`pass_sync`):
1. pad this rank's tokens to `rows`; padded rows get expert id `E`, which every backend skips;
2. one all-gather of hidden states, expert ids and routing weights packed into one byte row per token;
3. this rank's slice of all experts on all gathered tokens: one expert-backend call (one launch per GEMM);
4. one reduce-scatter of the partial outputs: each rank receives the sum over ranks for its own tokens.

Every rank computes the same rows against equally wide slices, so the work is balanced whatever the routing
skew, and nothing is dropped. No value is read back to the host inside the layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.moe.experts import ExpertWeights, run_experts
from engine.parallel.pass_sync import PassSync
from engine.parallel.rows import pack_rows, unpack_rows
from engine.parallel.runtime import Dist
from engine.parallel.stats import ExchangeStats, maybe_timing


def moeshard_forward(dist: Dist, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     rows: int, part: ExpertWeights, backend: str, stats: ExchangeStats | None = None) -> torch.Tensor:
    """`hidden (T, H)` with `T <= rows` → this rank's `(T, H)` expert output, summed over all ranks' slices."""
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    if rows == 0:  # every rank agreed there is nothing to do
        return hidden.new_zeros(num_tokens, hidden_size)
    pad = rows - num_tokens
    ids = topk_ids.to(torch.int64)
    if pad:
        hidden = F.pad(hidden, (0, 0, 0, pad))
        ids = F.pad(ids, (0, 0, 0, pad), value=part.num_experts)
        topk_weights = F.pad(topk_weights, (0, 0, 0, pad))
    packed = pack_rows(hidden, ids, topk_weights)
    gathered = dist.all_gather(packed)
    x_all, ids_all, w_all = unpack_rows(gathered, [(hidden_size, hidden.dtype), (top_k, torch.int64),
                                                   (top_k, topk_weights.dtype)])
    with maybe_timing(stats, hidden.device):
        partial = run_experts(x_all, ids_all.contiguous(), w_all, part, backend, out_dtype=hidden.dtype)
    out = dist.reduce_scatter(partial)
    if stats is not None:
        others = dist.size - 1
        stats.calls += 1
        moved = others * packed.numel() + others * rows * hidden_size * partial.element_size()
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
        return moeshard_forward(self.dist, hidden, topk_ids, topk_weights, rows, block.moeshard_part.weights(),
                                block.backend, self.stats)

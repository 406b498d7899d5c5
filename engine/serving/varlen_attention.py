"""Attention over a continuous batch's packed requests, each request attending only to its own keys.

transformers' continuous batching (5.24) runs SDPA and eager attention over the whole step at once: every query
token of every request against every key read back for every request, with a dense [queries, keys] mask that
blocks the pairs of different requests. The work grows with the square of the batch: 40 running requests of 400
tokens make each decode query look at 16,000 keys to use 400, and on CPU that attention was half of each step's
time (profiled on the decode benchmark's model). Flash attention's varlen kernel avoids this on GPUs, where it is
installed; this module is the same idea in plain PyTorch, so it runs wherever SDPA does:

- the requests that decode one token are batched into one SDPA call, their keys gathered into a padded
  [requests, heads, longest, head_dim] tensor with a padding mask (the work is the sum of their lengths, up to the
  padding to the longest);
- each request that prefills a chunk runs its own causal SDPA (a chunk after earlier ones sees all of them).

It reads the per-request boundaries transformers passes to flash attention (`cu_seq_lens_q`, `cu_seq_lens_k`),
so the continuous batch builds no dense mask at all (`engine.serving.paged_batch` turns it off). A call without
them (the dummy forward of an idle rank, or any plain forward) is plain SDPA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, flash_attention_mask

NAME = "tessera_varlen"


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """query [1, heads, queries, head_dim], key/value [1, kv_heads, keys, head_dim] (every request's keys, in
    request order); returns [1, queries, heads, head_dim], as transformers' attention functions do."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or isinstance(cu_k, dict):
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    q_starts, k_starts = cu_q.tolist(), cu_k.tolist()  # one host read per layer; the lengths steer the split
    q_lens = [b - a for a, b in zip(q_starts[:-1], q_starts[1:])]
    k_lens = [b - a for a, b in zip(k_starts[:-1], k_starts[1:])]
    gqa = query.shape[1] != key.shape[1]
    # token-major views ([tokens, heads, head_dim]): how the projections and the cache read lay them out, so
    # gathering tokens copies whole rows
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    out = torch.empty_like(q)
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    if decode:
        longest = max(k_lens[i] for i in decode)
        starts = torch.tensor([k_starts[i] for i in decode], device=q.device)
        lengths = torch.tensor([k_lens[i] for i in decode], device=q.device)
        offsets = torch.arange(longest, device=q.device)
        valid = offsets[None, :] < lengths[:, None]  # [requests, longest]
        index = (starts[:, None] + offsets[None, :]).masked_fill(~valid, 0).reshape(-1)
        padded = (len(decode), longest, k.shape[1], k.shape[2])
        keys = k.reshape(k.shape[0], -1).index_select(0, index).view(padded).transpose(1, 2)
        values = v.reshape(v.shape[0], -1).index_select(0, index).view(padded).transpose(1, 2)
        rows = torch.tensor([q_starts[i] for i in decode], device=q.device)
        queries = q.index_select(0, rows).unsqueeze(2)  # [requests, heads, 1, head_dim]
        result = F.scaled_dot_product_attention(queries, keys, values, attn_mask=valid[:, None, None, :],
                                                scale=scaling, enable_gqa=gqa)
        out.index_copy_(0, rows, result.squeeze(2))
    for i, n in enumerate(q_lens):
        if n <= 1:
            continue
        qs, ks, kn = slice(q_starts[i], q_starts[i + 1]), slice(k_starts[i], k_starts[i + 1]), k_lens[i]
        mask = None
        if kn != n:  # a later chunk: query j (at position kn - n + j) sees keys 0 .. kn - n + j
            mask = torch.ones(n, kn, dtype=torch.bool, device=q.device).tril(kn - n)
        chunk = F.scaled_dot_product_attention(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                                               v[ks].transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                               scale=scaling, enable_gqa=gqa)
        out[qs] = chunk[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> str:
    """Registers the attention (and, for the model's own mask building, flash attention's mask: none for packed
    rows) under NAME; returns NAME."""
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, varlen_attention)
        AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME

"""Attention over a continuous batch's packed requests, each request attending only to its own keys.

transformers' continuous batching (5.24) runs SDPA and eager attention over the whole step at once: every query
token of every request against every key read back for every request, with a dense [queries, keys] mask that
blocks the pairs of different requests. The work grows with the square of the batch: 40 running requests of 400
tokens make each decode query look at 16,000 keys to use 400, and on CPU that attention was half of each step's
time (profiled on the decode benchmark's model). Flash attention's varlen kernel avoids this on GPUs, where it is
installed; this module is the same idea in plain PyTorch, so it runs wherever SDPA does:

- the requests that decode one token are batched into SDPA calls of up to DECODE_GROUP requests of similar
  length, their keys gathered into a padded [requests, heads, longest, head_dim] tensor with a padding mask (the
  work is the sum of their lengths, up to the padding to each group's longest);
- each request that prefills a chunk runs its own causal SDPA (a chunk after earlier ones sees all of them).

It reads the per-request boundaries transformers passes to flash attention (`cu_seq_lens_q`, `cu_seq_lens_k`),
so the continuous batch builds no dense mask at all (`engine.serving.paged_batch` turns it off). A call without
them (the dummy forward of an idle rank, or any plain forward) is plain SDPA.

Where the cache allows it (`read_cache_by_page`), the keys come straight from the cache's pages instead of from
transformers' read-back. transformers (5.24) otherwise builds, every step, a Python list with the cache index of
every key of every request, and copies those keys token by token out of the cache in every layer; the padded
gather above then copied them again. Profiled on the decode benchmark's model with 64 running requests, those
per-token copies were half of a step's CPU time. Read by page, a request's keys are a few whole pages of 32
tokens, gathered once per layer straight into the padded layout, and the requests' lengths come as the host lists
the step was prepared from, so no layer reads the boundaries back from the device (on a GPU, a synchronisation per
layer). The groups, their pages and padding masks are worked out once per step (`StepPlan`) and every layer reuses
them, gathering into the same two scratch buffers; built per layer, with a fresh tensor per gather, the decode
benchmark's two saturated ranks made 7-8 % fewer tokens/s (benchmarks/results/attention_plan_ab_cpu/).
"""
from __future__ import annotations

import array
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, flash_attention_mask

NAME = "tessera_varlen"
# Decoding requests attend in groups of this many, sorted by length, each group padded to its own longest: with the
# decode benchmark's lengths (16-768) that reads about a third fewer padded keys than one group of 64, for a few
# more SDPA calls per layer.
DECODE_GROUP = 16


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """query [1, heads, queries, head_dim], key/value [1, kv_heads, keys, head_dim] (every request's keys, in
    request order; with the cache's pages in the kwargs, only this step's, already in those pages); returns
    [1, queries, heads, head_dim], as transformers' attention functions do."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or isinstance(cu_k, dict):
        kwargs.pop("is_causal", None)
        kwargs.pop(PAGES, None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    pages = kwargs.get(PAGES)
    # token-major views ([tokens, heads, head_dim]): how the projections and the cache read lay them out, so
    # gathering tokens copies whole rows
    q = query[0].transpose(0, 1)
    if pages is not None:  # the step's plan, from the host lengths it was prepared with: no device read here
        plan, keys_of = pages.plan, _PageReader(pages)
    else:  # one host read per layer; the lengths steer the split
        q_starts, k_starts = cu_q.tolist(), cu_k.tolist()
        q_lens = [b - a for a, b in zip(q_starts[:-1], q_starts[1:])]
        k_lens = [b - a for a, b in zip(k_starts[:-1], k_starts[1:])]
        plan, keys_of = StepPlan(q.device, q_lens, k_lens, q_starts=q_starts), _TokenReader(key, value, k_starts)
    gqa = query.shape[1] != key.shape[1]
    out = torch.empty_like(q)
    for group in plan.decode_groups:
        keys, values = keys_of.padded(group)  # [requests, kv_heads, longest, head_dim]
        # [requests, kv_heads, heads per kv head, head_dim]: one query of each head that shares a kv head, as
        # queries of that kv head (heads are grouped by kv head, as transformers' repeat_kv lays them out), so
        # the keys are read once, not repeated per head as SDPA's enable_gqa does (on CPU, half the time)
        queries = q.index_select(0, group.rows).view(group.size, keys.shape[1], -1, q.shape[-1])
        result = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.valid, scale=scaling)
        out.index_copy_(0, group.rows, result.reshape(group.size, *q.shape[1:]))
    for chunk in plan.chunks:
        keys, values = keys_of.one(chunk)  # [kv_heads, keys, head_dim]
        qs = slice(chunk.q_start, chunk.q_end)
        result = F.scaled_dot_product_attention(q[qs].transpose(0, 1)[None], keys[None], values[None],
                                                attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scaling,
                                                enable_gqa=gqa)
        out[qs] = result[0].transpose(0, 1)
    return out.unsqueeze(0), None


class DecodeGroup(NamedTuple):
    """Up to DECODE_GROUP decoding requests of similar length: their query rows, how many, the longest's key count,
    the padding mask [requests, 1, 1, longest] and, read by page, the pages to gather ([requests x pages])."""
    rows: torch.Tensor
    size: int
    longest: int
    valid: torch.Tensor
    pages: torch.Tensor | None
    requests: list[int]


class Chunk(NamedTuple):
    """A request that prefills `q_end - q_start` query tokens against `keys` keys (the later ones of a longer
    prompt see all earlier chunks: `mask`, else causal), and, read by page, its pages."""
    request: int
    q_start: int
    q_end: int
    keys: int
    mask: torch.Tensor | None
    pages: torch.Tensor | None


class StepPlan:
    """How a step's requests attend, worked out once per step from the host lengths: every layer of the step
    reuses its groups, index tensors and masks, and, read by page, one scratch buffer for the gathered keys and
    one for the values. `page_lists`: per request, the page of each of its blocks (read by page), times
    `page_stride`."""

    def __init__(self, device, q_lens: list[int], k_lens: list[int], page_lists: list[list[int]] | None = None,
                 page_size: int = 0, page_stride: int = 1, q_starts: list[int] | None = None):
        q_starts = q_starts or [0, *itertools.accumulate(q_lens)]
        decode = sorted((i for i, n in enumerate(q_lens) if n == 1), key=k_lens.__getitem__)
        groups = [decode[start: start + DECODE_GROUP] for start in range(0, len(decode), DECODE_GROUP)]
        chunks = [i for i, n in enumerate(q_lens) if n > 1]
        pages = [None] * (len(groups) + len(chunks))
        held = [-(-n // page_size) for n in k_lens] if page_size else None  # pages each request's keys fill
        if page_lists is not None:  # every group's and chunk's pages in one host array, made one tensor at once
            flat, bounds = array.array("q"), [0]
            for group in groups:  # each request's pages, padded with its first to the group's widest
                width = held[group[-1]]
                for i in group:
                    own = page_lists[i][: held[i]]
                    flat.extend(own)
                    flat.extend(own[:1] * (width - len(own)))
                bounds.append(len(flat))
            for i in chunks:
                flat.extend(page_lists[i][: held[i]])
                bounds.append(len(flat))
            every = torch.frombuffer(flat, dtype=torch.int64).to(device) * page_stride if flat else None
            pages = [every[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self.scratch_rows = max((p.numel() for p in pages[: len(groups)] if p is not None), default=0)
        self.scratch = None
        self.decode_groups = []
        for group, group_pages in zip(groups, pages):  # similar lengths together: little padding
            lengths = [k_lens[i] for i in group]
            longest = held[group[-1]] * page_size if held else lengths[-1]
            valid = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
            rows = torch.tensor([q_starts[i] for i in group], device=device)
            self.decode_groups.append(DecodeGroup(rows, len(group), longest, valid[:, None, None, :], group_pages,
                                                  group))
        self.chunks = []
        for i, chunk_pages in zip(chunks, pages[len(groups):]):
            n, kn = q_lens[i], k_lens[i]
            # a later chunk: query j (at position kn - n + j) sees keys 0 .. kn - n + j
            mask = torch.ones(n, kn, dtype=torch.bool, device=device).tril(kn - n) if kn != n else None
            self.chunks.append(Chunk(i, q_starts[i], q_starts[i + 1], kn, mask, chunk_pages))

    def buffers(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scratch rows for one layer's gathered key and value pages (rows of `like`, a page per row)."""
        if self.scratch is None or self.scratch[0].dtype != like.dtype or self.scratch[0].shape[1] != like.shape[1]:
            shape = (self.scratch_rows, like.shape[1])
            self.scratch = (like.new_empty(shape), like.new_empty(shape))
        return self.scratch


class _TokenReader:
    """Keys and values as transformers read them back: every request's, one after the other, token by token."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, k_starts: list[int]):
        self.k, self.v, self.starts = key[0].transpose(0, 1), value[0].transpose(0, 1), k_starts

    def padded(self, group: DecodeGroup):
        device = self.k.device
        starts = torch.tensor([self.starts[i] for i in group.requests], device=device)
        offsets = torch.arange(group.longest, device=device)
        index = (starts[:, None] + offsets[None, :]).masked_fill(~group.valid[:, 0, 0], 0).reshape(-1)
        shape = (group.size, group.longest, *self.k.shape[1:])
        keys = self.k.reshape(self.k.shape[0], -1).index_select(0, index).view(shape).transpose(1, 2)
        values = self.v.reshape(self.v.shape[0], -1).index_select(0, index).view(shape).transpose(1, 2)
        return keys, values

    def one(self, chunk: Chunk):
        span = slice(self.starts[chunk.request], self.starts[chunk.request] + chunk.keys)
        return self.k[span].transpose(0, 1), self.v[span].transpose(0, 1)


class Pages(NamedTuple):
    """What `read_cache_by_page` hands the attention of one layer: `k_pages`/`v_pages` [pages, page_size, kv_heads,
    head_dim] of this layer, and the step's `StepPlan` (the same for every layer)."""
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    plan: StepPlan


class _PageReader:
    """Keys and values read from the cache's pages, gathered into the step's scratch buffers."""

    def __init__(self, pages: Pages):
        self.token, self.plan = pages.k_pages.shape[2:], pages.plan
        # one row per page: index_select copies whole rows (on CPU about 5x faster than over the 4-d view)
        self.k, self.v = pages.k_pages.flatten(1), pages.v_pages.flatten(1)

    def padded(self, group: DecodeGroup):
        k_rows, v_rows = self.plan.buffers(self.k)
        n, shape = group.pages.numel(), (group.size, group.longest, *self.token)
        keys = torch.index_select(self.k, 0, group.pages, out=k_rows[:n]).view(shape).transpose(1, 2)
        values = torch.index_select(self.v, 0, group.pages, out=v_rows[:n]).view(shape).transpose(1, 2)
        return keys, values

    def one(self, chunk: Chunk):
        keys = self.k.index_select(0, chunk.pages).view(-1, *self.token)[: chunk.keys]
        values = self.v.index_select(0, chunk.pages).view(-1, *self.token)[: chunk.keys]
        return keys.transpose(0, 1), values.transpose(0, 1)


PAGES = "tessera_kv_pages"  # the attention kwarg read_cache_by_page adds: Pages


def read_cache_by_page(processor) -> bool:
    """Makes a transformers continuous batch processor (5.24) hand this attention its cache's pages instead of
    reading every key back token by token: step preparation builds write indices only (no read list), the cache
    update only writes (an empty read index is transformers' own write-only path), and then adds this layer's
    page views and the step's plan (`Pages`) to the attention's kwargs. Returns False,
    changing nothing, where the cache is not laid out as this expects (one full-attention group with page views,
    the index-based update rather than flash's block table, synchronous inputs)."""
    cache, io = processor.cache, processor.inputs_and_outputs
    allocators = list(getattr(cache, "cache_allocators", {}).values())
    if len(allocators) != 1 or getattr(allocators[0], "layer_type", None) != "full_attention" \
            or not all(hasattr(allocators[0], name) for name in ("_kv_page_views", "block_table",
                                                                 "block_physical_stride", "tokens_per_page")) \
            or getattr(cache, "max_blocks_per_request", 0) or not hasattr(io, "requests_in_batch") \
            or getattr(processor.model_runner, "pad_inputs", True):
        return False
    allocator = allocators[0]
    pages_per_block = allocator.block_physical_stride // allocator.tokens_per_page
    extend, update, prepare = cache.extend_read_and_write_indices, cache.update, io.prepare_batch_tensors
    step = {}

    def write_indices_only(request_id, past_length, query_length, read_index, write_index):
        extend(request_id, past_length, query_length, None, write_index)

    def prepare_with_page_table(requests_in_batch, *args, **kwargs):
        prepare(requests_in_batch, *args, **kwargs)
        # position_offset: the request's length once this step's tokens are in
        step["plan"] = StepPlan(io.device, [future.query_length for future in requests_in_batch],
                                [future.state.position_offset for future in requests_in_batch],
                                [allocator.block_table[future.state.request_id] for future in requests_in_batch],
                                allocator.tokens_per_page, pages_per_block)

    def update_then_pages(key_states, value_states, layer_idx, kwargs):
        key_states, value_states = update(key_states, value_states, layer_idx, kwargs)
        kwargs[PAGES] = Pages(*allocator._kv_page_views[layer_idx], step["plan"])
        return key_states, value_states

    cache.extend_read_and_write_indices = write_indices_only
    cache.update = update_then_pages
    io.prepare_batch_tensors = prepare_with_page_table
    return True


def register() -> str:
    """Registers the attention (and, for the model's own mask building, flash attention's mask: none for packed
    rows) under NAME; returns NAME."""
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, varlen_attention)
        AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME

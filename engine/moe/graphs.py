"""CUDA graphs for decode: at a few tokens per step a layer is a handful of tiny kernels, so launch overhead,
not the GPU, sets the pace; a graph replays a whole step's launches at once.

Two levels:

- `GraphedLayer`: one MoE block (single process, or MoEShard at one rank) at a fixed token count, captured with
  `torch.cuda.graph` and replayed on new inputs. This works because the layer's grids and buffers come from
  shapes alone and nothing in it reads the device (tests/moe/test_sync.py); tracked routing counts and the
  router-health flags are device buffers that the replays keep updating, so call `track_routing` before
  capturing.
- `enable_graphed_decode`: a model's whole decode step inside `generate()`, through transformers' own route:
  a static KV cache (fixed shapes) and the decode forward compiled with `mode="reduce-overhead"` (torch's
  CUDA-graph trees, one graph per batch shape). We take the library route rather than hand-capturing the model
  forward because generate() then keeps its sampling, streaming and stopping logic, and transformers and torch
  own the parts a hand capture gets wrong (the padded attention mask, cache positions, one memory pool across
  graphs). Batches are grouped into `DECODE_BUCKETS`, captured at load by `capture_decode_buckets` so the first
  request of each size does not pay for it.
"""
from __future__ import annotations

import torch
from torch import nn

DECODE_BUCKETS = (1, 2, 4, 8, 16)


class GraphedLayer:
    """`layer(hidden)` for hidden states of one fixed shape, replayed from a CUDA graph.

    A block used on its own checks its router logits on the host; captured, it raises device flags instead
    (a `RouterHealth`, `self.health`): call `self.health.raise_if_bad()` when convenient."""

    def __init__(self, layer: nn.Module, example: torch.Tensor, warmup: int = 2):
        from engine.moe.layer import MoEBlock, RouterHealth

        if example.device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA tensors, got {example.device}")
        if isinstance(layer, MoEBlock) and layer.health is None:
            layer.health = (RouterHealth([layer.extra_repr()]), 0)
        self.health = layer.health[0] if isinstance(layer, MoEBlock) else None
        self.layer = layer
        self.static_input = example.clone()
        side = torch.cuda.Stream(example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.no_grad(), torch.cuda.stream(side):  # first calls compile kernels and make lazy buffers
            for _ in range(warmup):
                layer(self.static_input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_output = layer(self.static_input)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape != self.static_input.shape:
            raise ValueError(f"captured for {tuple(self.static_input.shape)}, got {tuple(hidden.shape)}")
        self.static_input.copy_(hidden)
        self.graph.replay()
        return self.static_output  # overwritten by the next replay: clone to keep


def decode_bucket(batch: int, buckets=DECODE_BUCKETS) -> int | None:
    """The captured batch size a batch of `batch` sequences pads to, or None (larger: runs uncaptured)."""
    return next((b for b in buckets if b >= batch), None)


def enable_graphed_decode(model: nn.Module, max_cache_len: int = 2048) -> nn.Module:
    """Make `model.generate()` run its decode steps from CUDA graphs (see the module docstring). The KV cache
    is allocated for `max_cache_len` positions (prompt plus new tokens) once, and reused by every call."""
    from transformers import CompileConfig

    if not model.can_generate():
        raise ValueError(f"{type(model).__name__} does not generate: CUDA graphs here are for decode steps")
    config = model.generation_config
    config.cache_implementation = "static"
    config.max_cache_len = max_cache_len
    # fullgraph=False: a Python-level check outside the layers (e.g. the router-health hook) may break the
    # graph; the MoE layers themselves trace whole.
    config.compile_config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = max(limit, 2 * len(DECODE_BUCKETS))
    model.tessera_decode_buckets = DECODE_BUCKETS
    return model


def capture_decode_buckets(model: nn.Module, prompt_len: int = 4, buckets=DECODE_BUCKETS) -> None:
    """Run a short greedy generation per batch bucket, so each bucket's graph is captured now."""
    device = next(model.parameters()).device
    for batch in buckets:
        ids = torch.full((batch, prompt_len), 1, dtype=torch.long, device=device)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=0)

"""The one host synchronisation of a forward pass: agree on every rank's token count before any MoE layer runs.

Ranks run data-parallel attention on their own batches, so their token counts differ; MoEShard's all-gather and
EP's fixed-capacity all-to-all need one row count that every rank uses. Agreeing per layer would cost one host
round trip per layer (what makes the reference MoEShard code slow at small batches). Instead a forward pre-hook
on the model (and on each token stream's root, e.g. the encoder and decoder stacks of an encoder-decoder) reads
the token counts from the inputs, gathers them once, and every MoE layer of that pass pads its rows to the agreed
maximum. The same gather carries the previous pass's per-expert token counts for layers whose strategy is
chosen by the cost model, so `auto` sees the routing skew without a synchronisation of its own.

Nesting is handled: a stack called inside a model forward that already agreed does nothing; a stack called on its
own (generate() runs the encoder by itself) agrees for its stream. Every rank runs the same modules in the same
order, so the collectives match.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from engine.parallel.runtime import Dist
from engine.parallel.stats import ExchangeStats

CountFn = Callable[[tuple, dict], dict[str, int | None]]


class PassSync:
    def __init__(self, dist: Dist, stats: ExchangeStats | None = None):
        self.dist, self.stats = dist, stats
        self.agreed: dict[str, int] = {}
        self._depth = 0
        self._listeners: list = []  # objects with .history() -> (n,) int64 tensor and .receive(host (G, n))

    def add_listener(self, listener) -> None:
        self._listeners.append(listener)

    def attach(self, module: nn.Module, count_fn: CountFn) -> None:
        """Agree on the counts `count_fn(args, kwargs)` returns when `module`'s forward starts, unless already
        agreed by an enclosing forward; forget them when the outermost forward ends (even if it raises)."""

        def pre(_module, args, kwargs):
            self._depth += 1  # first: `post` runs even when agreeing fails
            counts = {s: n for s, n in count_fn(args, kwargs).items() if n is not None and s not in self.agreed}
            if counts:
                self._agree(counts)

        def post(_module, _args, _kwargs, _output):
            self._depth -= 1
            if self._depth == 0:
                self.agreed.clear()

        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True, always_call=True)

    def tokens(self, stream: str, local: int) -> int:
        """The agreed row count for `stream`; agrees now (one synchronisation) if no hook covered this call."""
        if stream not in self.agreed:
            self._agree({stream: local})
            if self._depth == 0:  # a block called on its own: nothing will clear it, so do not keep it
                return self.agreed.pop(stream)
        agreed = self.agreed[stream]
        if local > agreed:
            raise RuntimeError(f"MoE layer of stream {stream!r} got {local} tokens but the pass agreed on at most "
                               f"{agreed}: the count function does not match what reaches the layer")
        return agreed

    def _agree(self, counts: dict[str, int]) -> None:
        if self.dist.size == 1:  # one rank agrees with itself: no gather, no synchronisation
            self.agreed.update(counts)
            return
        streams = sorted(counts)
        parts = [torch.tensor([counts[s] for s in streams], dtype=torch.int64, device=self.dist.device)]
        parts += [listener.history() for listener in self._listeners]
        gathered = self.dist.all_gather(torch.cat(parts)[None])
        host = gathered.cpu()  # the pass's one host synchronisation
        if self.stats is not None:
            self.stats.host_syncs += 1
        self.agreed.update({s: int(host[:, i].max()) for i, s in enumerate(streams)})
        offset = len(streams)
        for listener, part in zip(self._listeners, parts[1:]):
            listener.receive(host[:, offset : offset + part.numel()])
            offset += part.numel()


def _token_count(bound: dict, ids_key: str, embeds_key: str) -> int | None:
    ids = bound.get(ids_key)
    if ids is not None:
        return ids.shape[0] * ids.shape[1] if ids.dim() >= 2 else ids.numel()
    embeds = bound.get(embeds_key)
    if embeds is not None:
        return embeds.shape[0] * embeds.shape[1]
    return None


def _binder(forward) -> Callable[[tuple, dict], dict]:
    names = [p for p in inspect.signature(forward).parameters]

    def bind(args, kwargs):
        return {**dict(zip(names, args)), **kwargs}

    return bind


def attach_hf(sync: PassSync, model: nn.Module, streams: set[str]) -> None:
    """Hooks for a Hugging Face model: the whole model agrees on all its streams at once; an encoder-decoder's
    stacks also agree on their own stream when called alone (as generate() calls the encoder)."""
    bind = _binder(model.forward)
    if getattr(model.config, "is_encoder_decoder", False):
        def model_counts(args, kwargs):
            b = bind(args, kwargs)
            runs_encoder = b.get("encoder_outputs") is None
            return {"encoder": _token_count(b, "input_ids", "inputs_embeds") if runs_encoder else None,
                    "decoder": _token_count(b, "decoder_input_ids", "decoder_inputs_embeds")}

        sync.attach(model, model_counts)
        for stream in sorted(streams):
            stack = getattr(model, stream, None)
            if stack is None:
                stack = getattr(getattr(model, "model", None), stream, None)
            if stack is None:
                raise ValueError(f"{type(model).__name__} has no {stream!r} stack to hook")
            stack_bind = _binder(stack.forward)
            sync.attach(stack, lambda a, k, s=stream, sb=stack_bind: {s: _token_count(sb(a, k), "input_ids",
                                                                                        "inputs_embeds")})
    else:
        sync.attach(model, lambda a, k: {"tokens": _token_count(bind(a, k), "input_ids", "inputs_embeds")})


def stream_of(block_name: str, model: nn.Module) -> str:
    """Which token stream a block sees: an encoder-decoder's encoder or decoder tokens, else the model's."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        head = block_name.split(".")[0]
        return "encoder" if head == "encoder" or ".encoder." in f".{block_name}" else "decoder"
    return "tokens"

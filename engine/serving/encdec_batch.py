"""One rank's running batch for a T5-style encoder-decoder (tested with Switch Transformers): the encoder runs once
per request when it joins, then every step is one batched decoder forward over all running requests.

Why not transformers' paged cache (`engine.serving.paged_batch.RankBatch`): its `ContinuousBatchingManager`
serves decoder-only models; it has no cross-attention cache and no encoder pass. So this module keeps the cache
itself, as one slab of rows in the layout transformers' `EncoderDecoderCache` expects:

- Self-attention keys and values, left-padded to the longest decoder prefix, with a mask. T5-style attention
  adds a relative position bias that depends only on key position minus query position, and every row's query is
  its newest token at the slab's last position, so shifting a row right by its padding leaves every distance (and
  so the output) unchanged; the padded keys are masked.
- Cross-attention keys and values, computed from the encoder's output when the request joins, right-padded to
  the longest prompt, with the encoder attention mask. Cross-attention has no position bias.

Requests join and leave at any step (EOS, `max_tokens`, cancellation): a joining row is padded in, a leaving row
is cut out, and columns no row needs any more are trimmed. Sampling, seeds, penalties and log-probabilities are
`engine.serving.paged_batch.RowSampling`'s, as for decoders. With a LoRA pool (`engine.lora.LoRAModel`), every
row has its own adapter mixture: the encoder and the cross-attention projections run inside the joining rows'
mixtures, each decoder step inside the running rows' (`LoRAModel.mixing`, one mixture per batch row).

Capacity is a budget of cached tokens, counted in blocks of `block_size` tokens so that the scheduler's
placement by free blocks works unchanged: a request reserves `ceil((prompt + max_tokens) / block_size)` blocks
(its cross-attention tokens plus every decoder token it can cache) when it starts, and gives them back when it
ends. Requests that do not fit wait here, oldest first; nothing is preempted. `step_tokens` caps the prompt
tokens encoded in one step, so a burst of long prompts does not stall the running decodes for long.

Lockstep ranks: the MoE layers of both stacks exchange tokens with every other rank on every forward, so with
`dummy_when_idle` every rank runs one decoder forward per step, a one-token dummy one when it has nothing to
decode, and one encoder forward (a dummy where nothing joins here) at every step where a request can join on any
rank. A rank cannot know that of the others; rank 0's scheduler can (it places every request, and every rank reports
what waits), and says so in the step's `encode`: without it every step would run the encoder on every rank.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import DynamicCache, EncoderDecoderCache

from engine.serving.coordinator import StepCannotPair
from engine.serving.lora_api import lora_model
from engine.serving.paged_batch import RankBatch, RowSampling


class _Row:
    """A running request: its sampling, its limits, what it generated, and the token it feeds the decoder next."""

    def __init__(self, request_id: str, token_ids: list[int], max_tokens: int, sampling: RowSampling, blocks: int,
                 start_token: int):
        self.id, self.token_ids, self.max_tokens, self.sampling = request_id, token_ids, max_tokens, sampling
        self.blocks, self.next_input = blocks, start_token
        self.generated: list[int] = []


class EncDecBatch:
    """The requests one rank is generating with an encoder-decoder model; same interface as `RankBatch`."""

    def __init__(self, model, *, num_blocks: int, block_size: int = 32, step_tokens: int = 256,
                 max_requests: int = 64, pad_token_id: int = 0, eos_token_id=None, dummy_when_idle: bool = False):
        self.model, self.pad, self.dummy_when_idle = model, pad_token_id, dummy_when_idle
        # with a LoRA pool, the parts of the model run inside its mixture for their rows (`_adapters`)
        self.lora = lora_model(model)
        self.net = self.lora.model if self.lora is not None else model
        self.anyone_joins = True  # this step: see run()
        self.num_blocks, self.block_size = num_blocks, block_size
        self.step_tokens, self.max_requests = step_tokens, max_requests
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        eos = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        start = model.generation_config.decoder_start_token_id
        self.start_token = model.config.decoder_start_token_id if start is None else start
        self.encoder = model.get_encoder()
        self.cross_attention = [block.layer[1].EncDecAttention for block in model.get_decoder().block]
        forward = inspect.signature(type(self.net).forward).parameters
        self.cache_kwarg = "cache" if "cache" in forward else "past_key_values"  # the older name
        self.rows: list[_Row] = []  # running, in slab order
        self.waiting: list[_Row] = []  # added, not yet encoded
        self.reserved = 0  # blocks held by running requests
        self.pending: list[dict] = []  # events decided outside a step (a request that can never fit)
        self.encoder_output = None  # the encoder's output class, known after the first encoder forward
        attention = self.cross_attention[0]
        heads, head_dim = attention.n_heads, attention.key_value_proj_dim
        empty = torch.zeros((0, heads, 0, head_dim), dtype=self.dtype, device=self.device)
        self.self_kv = [(empty, empty) for _ in self.cross_attention]
        self.cross_kv = [(empty, empty) for _ in self.cross_attention]
        self.self_mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.encoder_mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)

    # --- the interface the scheduler uses ----------------------------------------------------------------------

    def add(self, request_id: str, token_ids: list[int], max_tokens: int, temperature: float = 0.0,
            top_p: float = 1.0, seed: int | None = None, presence_penalty: float = 0.0,
            frequency_penalty: float = 0.0, logprobs: int | None = None, adapters: dict | None = None) -> None:
        blocks = -(-(len(token_ids) + max_tokens) // self.block_size)
        if not token_ids:
            self.pending.append(_error_event(request_id, "an encoder-decoder needs a prompt of at least one token"))
            return
        if adapters and self.lora is None:
            self.pending.append(_error_event(request_id, "this model was loaded without LoRA adapters"))
            return
        if blocks > self.num_blocks:
            self.pending.append(_error_event(request_id, f"the prompt ({len(token_ids)} tokens) and max_tokens "
                                                         f"({max_tokens}) need {blocks} blocks; this rank holds "
                                                         f"{self.num_blocks}"))
            return
        sampling = RowSampling.of_request(self.device, temperature, top_p, seed, presence_penalty,
                                          frequency_penalty, logprobs, adapters)
        self.waiting.append(_Row(request_id, list(token_ids), max_tokens, sampling, blocks, self.start_token))

    def cancel(self, request_id: str) -> None:
        self.waiting = [row for row in self.waiting if row.id != request_id]
        self._leave([i for i, row in enumerate(self.rows) if row.id == request_id])

    def close(self) -> None:
        """Nothing of the model was changed: only the requests are dropped."""
        self.waiting.clear()
        self._leave(list(range(len(self.rows))))

    def run(self, op: dict, rank: int) -> dict:
        """A scheduler step operation, as `RankBatch.run`; `op["encode"]`: whether a request can join on any rank."""
        self.anyone_joins = op.get("encode", True)
        return RankBatch.run(self, op, rank)

    def step(self) -> list[dict]:
        """Encode the requests that can start now, then one decoder forward over every running request (dummy
        forwards where there is nothing and the ranks must stay in lockstep). Events as `RankBatch.step`'s."""
        events, self.pending = self.pending, []
        joining = self._admit()
        if joining and not self.anyone_joins:
            raise StepCannotPair("a request joins on a rank that rank 0 did not expect to encode")
        # (the first step encodes on every rank all the same: it learns the encoder's output class)
        if joining or (self.dummy_when_idle and (self.anyone_joins or self.encoder_output is None)):
            events += self._encode(joining)
        if self.rows:
            events += self._decode()
        elif self.dummy_when_idle:
            self._dummy_decode()
        return events

    def stats(self) -> dict:
        return {"blocks_total": self.num_blocks, "blocks_free": self.num_blocks - self.reserved,
                "block_size": self.block_size, "running": len(self.rows), "waiting": len(self.waiting),
                "preemptions": 0}

    def idle(self) -> bool:
        return not self.rows and not self.waiting and not self.pending

    # --- joining and leaving -----------------------------------------------------------------------------------

    def _admit(self) -> list[_Row]:
        """The oldest waiting requests that fit the running limit, the block budget and this step's prompt
        tokens (the first always gets its prompt encoded, however long)."""
        joining, tokens = [], 0
        while self.waiting and len(self.rows) + len(joining) < self.max_requests:
            row = self.waiting[0]
            if self.reserved + row.blocks > self.num_blocks:
                break
            if joining and tokens + len(row.token_ids) > self.step_tokens:
                break
            self.waiting.pop(0)
            self.reserved += row.blocks
            tokens += len(row.token_ids)
            joining.append(row)
        return joining

    def _encode(self, joining: list[_Row]) -> list[dict]:
        """The encoder over the joining prompts (right-padded), whose output becomes their cross-attention keys and
        values in every decoder layer; a dummy token when none join."""
        prompts = [row.token_ids for row in joining] or [[self.pad]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt)
            mask[i, : len(prompt)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        try:
            with torch.no_grad(), self._adapters(joining or [None]):
                encoded = self.encoder(input_ids=ids, attention_mask=mask)
                self.encoder_output = type(encoded)  # what the model's forward reads fields of (router_logits, ...)
                hidden = encoded.last_hidden_state
                cross = [(self._heads(attention, attention.k(hidden)), self._heads(attention, attention.v(hidden)))
                         for attention in self.cross_attention]
        except Exception as err:  # e.g. a kernel launch failure: these requests fail, and one rank goes on
            self.reserved -= sum(row.blocks for row in joining)
            if self.dummy_when_idle:  # the other ranks may wait in this forward's collectives: all must stop
                raise StepCannotPair(f"{type(err).__name__}: {err}") from err
            return [_error_event(row.id, f"{type(err).__name__}: {err}") for row in joining]
        if joining:
            self._join(joining, cross, mask)
        return []

    @staticmethod
    def _heads(attention, states: torch.Tensor) -> torch.Tensor:
        """(batch, length, heads * head_dim) -> (batch, heads, length, head_dim), as the attention module does."""
        batch, length = states.shape[:2]
        return states.view(batch, length, attention.n_heads, attention.key_value_proj_dim).transpose(1, 2)

    def _join(self, joining: list[_Row], cross: list[tuple], mask: torch.Tensor) -> None:
        """Pad the joining rows into the slab: no decoder tokens yet (all left padding), their encoder output
        right-padded to the slab's width (or the slab's to theirs)."""
        count, width = len(joining), self.self_mask.shape[1]
        source = max(self.encoder_mask.shape[1], mask.shape[1])

        def right(t, length):  # pad dimension -2 (tokens) of a (rows, heads, tokens, head_dim) tensor, or a mask
            return F.pad(t, (0, 0, 0, length - t.shape[-2])) if t.dim() == 4 else F.pad(t, (0, length - t.shape[-1]))

        for layer, ((k, v), (new_k, new_v)) in enumerate(zip(self.cross_kv, cross)):
            self.cross_kv[layer] = (torch.cat([right(k, source), right(new_k, source)]),
                                    torch.cat([right(v, source), right(new_v, source)]))
        self.encoder_mask = torch.cat([right(self.encoder_mask, source), right(mask, source)])
        for layer, (k, v) in enumerate(self.self_kv):
            blank = k.new_zeros((count, *k.shape[1:]))
            self.self_kv[layer] = (torch.cat([k, blank]), torch.cat([v, blank]))
        self.self_mask = torch.cat([self.self_mask, self.self_mask.new_zeros((count, width))])
        self.rows += joining

    def _leave(self, indices: list[int]) -> None:
        """Cut rows out of the slab, give back their blocks, and trim the columns no remaining row uses."""
        if not indices:
            return
        gone = set(indices)
        self.reserved -= sum(self.rows[i].blocks for i in gone)
        keep = torch.tensor([i for i in range(len(self.rows)) if i not in gone], dtype=torch.long,
                            device=self.device)
        self.rows = [row for i, row in enumerate(self.rows) if i not in gone]
        self.self_mask, self.encoder_mask = self.self_mask[keep], self.encoder_mask[keep]
        width = self.self_mask.shape[1]
        padding = int((width - self.self_mask.sum(1)).min()) if self.rows else width
        source = int(self.encoder_mask.sum(1).max()) if self.rows else 0
        self.self_mask, self.encoder_mask = self.self_mask[:, padding:], self.encoder_mask[:, :source]
        self.self_kv = [(k[keep, :, padding:], v[keep, :, padding:]) for k, v in self.self_kv]
        self.cross_kv = [(k[keep, :, :source], v[keep, :, :source]) for k, v in self.cross_kv]

    # --- the decoder step --------------------------------------------------------------------------------------

    def _decode(self) -> list[dict]:
        """One decoder forward over every running row (its newest token), then each row's next token."""
        count = len(self.rows)
        ids = torch.tensor([[row.next_input] for row in self.rows], dtype=torch.long, device=self.device)
        self_mask = torch.cat([self.self_mask, self.self_mask.new_ones((count, 1))], dim=1)
        # cross-attention filled: read, never recomputed
        cache = EncoderDecoderCache(_holding(self.self_kv), _holding(self.cross_kv))
        # The decoder takes its cross-attention keys from the cache; the encoder output only gives the shapes.
        source = self.encoder_mask.shape[1]
        hidden = torch.zeros((), dtype=self.dtype, device=self.device).expand(count, source, self.model.config.d_model)
        try:
            with torch.no_grad(), self._adapters(self.rows):
                out = self.net(encoder_outputs=self.encoder_output(last_hidden_state=hidden),
                               attention_mask=self.encoder_mask, decoder_input_ids=ids,
                               decoder_attention_mask=self_mask, use_cache=True, **{self.cache_kwarg: cache})
            logits = out.logits[:, -1]
            self.self_kv = [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers]
            self.self_mask = self_mask
        except Exception as err:  # this step's requests fail, and one rank goes on
            failed = [_error_event(row.id, f"{type(err).__name__}: {err}") for row in self.rows]
            self._leave(list(range(count)))
            if self.dummy_when_idle:
                raise StepCannotPair(f"{type(err).__name__}: {err}") from err
            return failed
        tokens = torch.argmax(logits, dim=-1).tolist()
        events, done = [], []
        for i, row in enumerate(self.rows):
            sampling = row.sampling
            if sampling.penalised() or sampling.temperature > 0 or sampling.logprobs is not None:
                tokens[i] = int(sampling.choose(logits[i], row.generated))
            token = tokens[i]
            row.generated.append(token)
            row.next_input = token
            entries = [sampling.entries[-1]] if sampling.logprobs is not None else None
            finish = None
            if token in self.eos:
                finish, entries = "stop", [] if entries is not None else None
            elif len(row.generated) >= row.max_tokens:
                finish = "length"
            if finish is not None:
                done.append(i)
            events.append({"id": row.id, "tokens": [] if finish == "stop" else [token], "logprobs": entries,
                           "finish": finish, "error": None})
        self._leave(done)
        return events

    def _dummy_decode(self) -> None:
        """One decoder token over a one-token dummy encoder output, so this rank joins the step's collectives."""
        ids = torch.full((1, 1), self.start_token, dtype=torch.long, device=self.device)
        hidden = torch.zeros((1, 1, self.model.config.d_model), dtype=self.dtype, device=self.device)
        with torch.no_grad(), self._adapters([None]):
            self.net(encoder_outputs=self.encoder_output(last_hidden_state=hidden), decoder_input_ids=ids,
                     use_cache=False)

    def _adapters(self, rows: list):
        """The LoRA mixture of each row (None: a dummy row, the base model) for the forwards inside."""
        if self.lora is None:
            return nullcontext()
        return self.lora.mixing([row.sampling.adapters if row is not None else {} for row in rows], len(rows))


def _holding(tensors: list[tuple]) -> DynamicCache:
    """A cache whose layers hold these (keys, values) themselves: an empty update creates each layer, then the
    layer takes the tensors (an update with them would copy the whole slab at every step)."""
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(tensors):
        cache.update(keys[:, :, :0], values[:, :, :0], layer)
        cache.layers[layer].keys, cache.layers[layer].values = keys, values
    return cache


def _error_event(request_id: str, message: str) -> dict:
    return {"id": request_id, "tokens": [], "logprobs": None, "finish": "error", "error": message}

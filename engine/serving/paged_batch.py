"""One rank's running batch over a paged KV cache, built on transformers' continuous batching.

transformers' `ContinuousBatchingManager` (5.17 and later) already schedules requests over a paged cache: requests
join between steps, leave at EOS or `max_new_tokens`, long prompts are prefilled in chunks of the step's token
budget, and when the cache is full the newest starved request is soft reset (its cache freed, its tokens so far
recomputed as prompt later). What it cannot do for tessera, and what this module adds around it:

- Lockstep ranks. The manager runs its own thread and only calls the model when it has work. MoEShard and EP
  layers exchange tokens with every other rank on every forward pass (and `PassSync` agrees on the token counts
  once per pass), so every rank must run exactly one forward per step. Here the caller drives the steps
  (`step()`), and a rank with nothing scheduled runs a one-token dummy forward instead.
- Per-request sampling. The manager samples every row with one global generator and one temperature. Here each
  request has its own temperature, top-p and `torch.Generator`, so a seeded request gives the same tokens
  whatever it is batched with.
- LoRA per token. With an adapter pool (`engine.lora.LoRAModel`), each step's packed rows go through the pool's
  packed mixture (`forward(seq_lens=...)`): every request has its own adapter mixture, in the same pass.
- Counters for /metrics (blocks used and free, preemptions), read through the cache API of the installed version.

CUDA graphs and async batching stay off: a graph cannot capture the per-pass host agreement, and async batching
would overlap two forwards whose collectives must pair one to one with the other ranks'.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from engine.serving.coordinator import StepCannotPair

try:  # transformers 5.17 and 5.24 both define it here
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
except ImportError:  # pragma: no cover - only very old transformers
    ContinuousBatchingConfig = None


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values that one block of `block_size` tokens takes over all layers."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = config.num_hidden_layers
    if getattr(config, "is_encoder_decoder", False):  # T5-style: a token's self- or cross-attention K/V per decoder
        layers, head_dim = config.num_decoder_layers, config.d_kv  # layer (engine.serving.encdec_batch)
    return 2 * layers * heads * head_dim * block_size * torch.empty((), dtype=dtype).element_size()


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of the device; on CPU, available RAM shared by this node's ranks."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def kv_blocks_for_budget(model, block_size: int, kv_bytes: int | None, kv_fraction: float,
                         most_useful: int | None = None) -> int:
    """Blocks in a KV budget given as bytes, or else as a fraction of the device's free memory; a fraction gives
    at most `most_useful` blocks (what the scheduler's limits can ever fill), so a CPU run does not take gigabytes
    it cannot use."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    budget = kv_bytes if kv_bytes is not None else int(kv_fraction * free_memory_bytes(device))
    blocks = budget // kv_bytes_per_block(model.config, block_size, dtype)
    if kv_bytes is None and most_useful is not None:
        blocks = min(blocks, most_useful)
    if blocks < 1:
        raise ValueError(f"a KV budget of {budget} bytes holds no block of {block_size} tokens "
                         f"({kv_bytes_per_block(model.config, block_size, dtype)} bytes each)")
    return int(blocks)


@dataclass
class RowSampling:
    """How one request picks its tokens: temperature (0: greedy), top-p, its own generator, OpenAI's presence and
    frequency penalties (over the tokens it generated), and how many alternatives to report with each token's
    log-probability (None: no log-probabilities)."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    adapters: dict = field(default_factory=dict)  # LoRA mixture name -> weight ({}: the base model)
    entries: list = field(default_factory=list)  # per generated token: (logprob, [(id, logprob), ...])
    delivered: int = 0  # tokens already reported

    @classmethod
    def of_request(cls, device, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logprobs: int | None = None,
                   adapters: dict | None = None) -> "RowSampling":
        """A request's settings, with a generator of its own (seeded, or from the OS) when it samples."""
        generator = None
        if temperature > 0:
            generator = torch.Generator(device)
            generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return cls(temperature, top_p, generator, presence_penalty, frequency_penalty, logprobs, dict(adapters or {}))

    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def per_row(self) -> bool:
        """Whether this row needs its own pick (sampling, penalties, log-probabilities), not the batched argmax."""
        return self.penalised() or self.temperature > 0 or self.logprobs is not None

    def choose(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        """This row's next token from its `logits` (one row over the vocabulary) given the tokens it generated so
        far (only read when penalised); records the token's log-probability entry (of the model's own
        distribution, before penalties and temperature) when the request asked for them."""
        raw = logits
        if self.penalised():
            counts = torch.bincount(torch.tensor(generated, dtype=torch.long, device=raw.device),
                                    minlength=raw.shape[0]).to(raw.dtype) if generated else torch.zeros_like(raw)
            raw = raw - counts * self.frequency_penalty - (counts > 0).to(raw.dtype) * self.presence_penalty
        token = sample_row(raw, self.temperature, self.top_p, self.generator) if self.temperature > 0 \
            else torch.argmax(raw)
        if self.logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            top = logprobs.topk(self.logprobs) if self.logprobs else None
            alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            self.entries.append((logprobs[token].item(), alternatives))
        return token


class RankBatch:
    """The requests one rank is generating, stepped by the caller: `step(add, cancel)` runs one forward pass."""

    def __init__(self, model, *, num_blocks: int, block_size: int = 32, step_tokens: int = 256,
                 max_requests: int = 64, pad_token_id: int = 0, eos_token_id=None, dummy_when_idle: bool = False):
        if ContinuousBatchingConfig is None:
            raise RuntimeError("continuous batching needs transformers >= 5.17")
        self.model, self.pad, self.dummy_when_idle = model, pad_token_id, dummy_when_idle
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        fields = ContinuousBatchingConfig.__dataclass_fields__
        size_field = "page_size" if "page_size" in fields else "block_size"  # renamed after 5.17
        cb_config = ContinuousBatchingConfig(**{size_field: block_size}, num_blocks=num_blocks,
                                             max_batch_tokens=step_tokens, max_requests_per_batch=max_requests,
                                             allow_block_sharing=False, use_async_batching=False,
                                             use_cuda_graph=False, cpu_offload_space=0.0)
        generation = GenerationConfig(do_sample=False, max_new_tokens=1, eos_token_id=sorted(self.eos) or -1,
                                      pad_token_id=pad_token_id)  # sampling is ours: see _sample
        self.manager = model.init_continuous_batching(generation_config=generation,
                                                      continuous_batching_config=cb_config)
        self.processor = self.manager._create_batch_processor()
        self.manager.batch_processor = self.processor
        self.cache, self.scheduler = self.processor.cache, self.processor.scheduler
        self.num_blocks, self.block_size = int(self.cache.num_blocks), block_size
        self.sampling: dict[str, RowSampling] = {}
        self.per_row: set[str] = set()  # requests that cannot take the batched argmax (see _sample)
        self.preemptions = 0
        self.processor.model_runner._sample = self._sample
        self.forward_model = _PackedAdapters(model, self) if hasattr(model, "pool") else model
        offload = self.processor.offloading_manager.offload_requests

        def counted_offload():
            before = len(self.scheduler.active_requests)
            result = offload()
            self.preemptions += max(before - len(self.scheduler.active_requests), 0)
            return result

        self.processor.offloading_manager.offload_requests = counted_offload
        self._attention_before = _use_varlen_attention(model, self.processor)

    def add(self, request_id: str, token_ids: list[int], max_tokens: int, temperature: float = 0.0,
            top_p: float = 1.0, seed: int | None = None, presence_penalty: float = 0.0,
            frequency_penalty: float = 0.0, logprobs: int | None = None, adapters: dict | None = None) -> None:
        row = RowSampling.of_request(self.device, temperature, top_p, seed, presence_penalty, frequency_penalty,
                                     logprobs, adapters)
        self.sampling[request_id] = row
        if row.per_row():
            self.per_row.add(request_id)
        self.manager.add_request(list(token_ids), request_id=request_id, max_new_tokens=max_tokens, streaming=True)

    def cancel(self, request_id: str) -> None:
        if request_id in self.sampling:
            self.manager.cancel_request(request_id)
            self._forget(request_id)

    def close(self) -> None:
        """Give the model back its own attention implementation (5.17 switched it to a paged one)."""
        if self._attention_before is not None:
            self.model.set_attn_implementation(self._attention_before)
            self._attention_before = None
        original = getattr(self.manager, "_original_attn_impl", None)
        if original is not None:
            self.model.set_attn_implementation(original)
            self.manager._original_attn_impl = None

    def run(self, op: dict, rank: int) -> dict:
        """A scheduler step operation: add and drop this rank's requests, step, report. Under inference mode, as
        transformers' own generation thread steps when its caller is: nothing of a step is ever differentiated,
        and each of the tiny model's many small torch calls costs less without autograd's bookkeeping."""
        with torch.inference_mode():
            for request in op["add"][rank]:
                self.add(**request)
            for request_id in op["cancel"][rank]:  # after adding: a request may leave at the step it joins
                self.cancel(request_id)
            events = self.step()
        return {"events": events, "kv": self.stats()}

    def step(self) -> list[dict]:
        """One forward pass over the scheduled requests (or a dummy one): returns an event per request that
        advanced: {"id", "tokens" (new since the last event), "logprobs" (an entry per token, or None),
        "finish": None | "stop" | "length" | "error", "error" (the message, or None)}."""
        try:
            scheduled = self.processor.prepare_next_batch()
        except Exception as err:  # scheduling itself failed: every request here fails, the rank goes on
            events = self._fail_all(err)
            if self.dummy_when_idle:
                self._dummy_forward()  # no forward ran yet: the other ranks' collectives still need this one
            return events
        try:
            if scheduled:
                self.processor._generation_step(self.forward_model)
                self.processor.update_batch()
            elif self.dummy_when_idle:
                self._dummy_forward()
        except Exception as err:  # e.g. a kernel launch failure: this step's requests fail
            if scheduled:
                self.processor.handle_batch_error(err)
            if self.dummy_when_idle:
                raise StepCannotPair(f"{type(err).__name__}: {err}") from err
        return self._events()

    def stats(self) -> dict:
        return {"blocks_total": self.num_blocks, "blocks_free": self.free_blocks(), "block_size": self.block_size,
                "running": len(self.scheduler.active_requests), "waiting": len(self.scheduler.waiting_requests),
                "preemptions": self.preemptions}

    def free_blocks(self) -> int:
        if hasattr(self.cache, "get_num_free_blocks"):  # transformers 5.17
            return int(self.cache.get_num_free_blocks())
        return round(self.cache.compute_free_capacity(relative=True) * self.num_blocks)  # 5.24: sectors

    def idle(self) -> bool:
        return not self.sampling

    def _events(self) -> list[dict]:
        events = []
        outputs = self.manager.output_router.output_queue
        while not outputs.empty():
            out = outputs.get_nowait()
            if out.request_id not in self.sampling:  # cancelled meanwhile
                continue
            row = self.sampling[out.request_id]
            tokens = list(out.generated_tokens)[row.delivered:]
            entries = row.entries[row.delivered: row.delivered + len(tokens)] if row.logprobs is not None else None
            row.delivered += len(tokens)
            finish, error = None, None
            if out.error is not None:
                finish, error = "error", out.error
            elif out.is_finished():
                finish = "stop" if tokens and tokens[-1] in self.eos else "length"
                if finish == "stop":
                    tokens, entries = tokens[:-1], entries[:-1] if entries is not None else None
            if finish is not None:
                self._forget(out.request_id)
            events.append({"id": out.request_id, "tokens": tokens, "logprobs": entries, "finish": finish,
                           "error": error})
        return events

    def _fail_all(self, err: Exception) -> list[dict]:
        self.processor.fail_all_requests(err)
        events = self._events()
        for request_id in list(self.sampling):  # anything the processor did not report
            events.append({"id": request_id, "tokens": [], "logprobs": None, "finish": "error",
                           "error": f"{type(err).__name__}: {err}"})
            self._forget(request_id)
        return events

    def _forget(self, request_id: str) -> None:
        self.sampling.pop(request_id, None)
        self.per_row.discard(request_id)

    def _dummy_forward(self) -> None:
        """One token through the model without the paged cache, so this rank joins the step's collectives."""
        ids = torch.full((1, 1), self.pad, dtype=torch.long, device=self.device)
        with torch.no_grad(), _plain_attention(self.model.config):
            self.model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def _sample(self, scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        """Replaces the runner's sampler: row i of `scores` belongs to the i-th scheduled request that predicts a
        token this step; each picks it with its own `RowSampling` (greedy rows keep the batched argmax)."""
        logits = scores[0]
        tokens = torch.argmax(logits, dim=-1)
        # with every row greedy, without penalties or log-probabilities, nothing is done per row
        scheduled = [f.state for f in self.processor.inputs_and_outputs.requests_in_batch if f.has_new_token] \
            if self.per_row else []
        for i, state in enumerate(scheduled[: logits.shape[0]]):
            row = self.sampling.get(state.request_id)
            if row is not None and row.per_row():
                generated = state.to_generation_output().generated_tokens if row.penalised() else []
                tokens[i] = row.choose(logits[i], generated)
        output_ids[0, : tokens.shape[0]].copy_(tokens.to(output_ids.dtype))


class _PackedAdapters:
    """The model as transformers' runner calls it, for a LoRA pool: adds each scheduled request's adapter mixture
    and its query length (`seq_lens`) to the packed forward, so the mixture kernel applies per token."""

    def __init__(self, lora_model, batch: RankBatch):
        self.lora_model, self.batch = lora_model, batch

    def __getattr__(self, name):  # what the runner asks of the model (_supports_logits_to_keep, ...)
        return getattr(self.lora_model, name)

    def __call__(self, **kwargs):
        scheduled = [f.state.request_id for f in self.batch.processor.inputs_and_outputs.requests_in_batch]
        bounds = kwargs["cu_seq_lens_q"].tolist()
        seq_lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])][: len(scheduled)]
        weights = [self.batch.sampling[r].adapters if r in self.batch.sampling else {} for r in scheduled]
        return self.lora_model(**kwargs, adapter_weights=weights, seq_lens=seq_lens)


def _use_varlen_attention(model, processor) -> str | None:
    """Switches the model to per-request attention (`engine.serving.varlen_attention`) where transformers would
    attend over the whole packed step with a dense mask: SDPA with full attention in every layer, on a version
    whose batch inputs hold that mask (5.24), reading the keys from the cache's pages where its layout allows.
    Returns the implementation to give back at close, or None where it left the model as it was (flash attention,
    sliding windows, 5.17's paged names)."""
    from engine.serving.varlen_attention import read_cache_by_page, register

    inputs = processor.inputs_and_outputs
    config = model.config
    full = all(t == "full_attention" for t in (getattr(config, "layer_types", None) or ["full_attention"]))
    if config._attn_implementation != "sdpa" or getattr(config, "sliding_window", None) or not full \
            or getattr(inputs, "attention_mask", None) is None:
        return None
    inputs.attention_mask = None  # no dense mask to build; the attention reads cu_seq_lens instead
    model.set_attn_implementation(register())
    read_cache_by_page(processor)
    return "sdpa"


def sample_row(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token from `softmax(logits / temperature)`, restricted to the smallest top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keeps the token that crosses top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[0]


@contextlib.contextmanager
def _plain_attention(config):
    """transformers 5.17 names its paged attention 'paged|sdpa', which refuses a forward without the cache; later
    versions page through the cache object and keep the plain name. The dummy forward needs the plain one."""
    original = config._attn_implementation
    if isinstance(original, str) and original.startswith("paged|"):
        config._attn_implementation = original.removeprefix("paged|")
    try:
        yield
    finally:
        if config._attn_implementation != original:
            config._attn_implementation = original

"""Continuous batching over every rank: rank 0's scheduler thread steps all ranks in lockstep.

Each step, rank 0 sends every rank the requests it places there and the ones to drop (client gone, stop string
found), every rank runs one forward pass over its own running batch (`engine.serving.paged_batch.RankBatch`, a
dummy one when it has nothing), and sends back each request's new tokens and its KV blocks free. A new request goes
to a rank whose free blocks hold it, the one with the fewest prompt tokens still waiting for a first token (see
`_place`). Tokens reach the client from whichever rank generates them, at the step they are made.

With a LoRA pool, each request carries its adapter mixture (named, or routed once for "auto") and the packed
forward applies it per token. A request joins a rank only when that rank's device adapter cache holds its
adapters beside those of the rank's other requests; adapter loads and unloads run on every rank between two
steps (engine.serving.lora_api says how they wait and what they refuse).

The narrow interface (used by the HTTP app and by `generate_batch` offline):

    engine.submit(request)            # a batcher.Request of kind "generate"; raises Overloaded / RankFailure /
                                      # RequestTooLarge at once
    async for step in engine.generate(request): ...   # a Generation (tokens, logprobs) of each step's new tokens;
                                                      # raises StepFailure (a rank's step failed) or RankFailure;
                                                      # closing the iterator early cancels the request

As with the static batcher, a streaming request also gets `(token id, logprob entry or None)` per token on
`request.tokens` (then None, or the exception), and a non-streaming one its `Generation` on `request.future`.
"""
from __future__ import annotations

import asyncio
import collections
import queue
import sys
import threading
import time
import uuid
from typing import AsyncIterator

from engine.serving.batcher import Overloaded, Request, fail_and_exit
from engine.serving.coordinator import Coordinator, RankFailure
from engine.serving.lora_api import (apply_everywhere, load_between_steps, lora_model, request_error,
                                     unknown_or_too_large)
from engine.serving.sampling import Generation

_STOP = object()
SWITCH_INTERVAL_S = 0.0002  # see ContinuousEngine.start


class StepFailure(RuntimeError):
    """A rank's step raised (for example a kernel launch failure): the requests of that step fail, nothing else."""


class RequestTooLarge(ValueError):
    """The prompt and `max_tokens` need more KV blocks than a whole rank's cache holds."""


class ContinuousEngine:
    def __init__(self, coordinator: Coordinator, metrics=None, tokenizer=None, *, max_queue: int = 256,
                 max_running_per_rank: int = 128, heartbeat_s: float = 2.0, router=None):
        self.coordinator, self.metrics, self.tokenizer, self.router = coordinator, metrics, tokenizer, router
        self.world = coordinator.world
        self.max_running_per_rank, self.heartbeat_s = max_running_per_rank, heartbeat_s
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.incoming: collections.deque = collections.deque()  # taken from the queue, not yet on a rank
        self.active: dict[str, tuple[Request, int]] = {}  # request id -> (request, rank)
        self.to_cancel: list[list[str]] = [[] for _ in range(self.world)]
        self.kv: list[dict] = []  # per rank, after the last step: blocks_total, blocks_free, running, waiting
        self.healthy, self.failure = True, None
        self.stopping = False
        self._outbox: dict | None = None  # event loop -> calls, while a step's results are delivered
        # a LoRA pool: loads and unloads wait here for their turn between two steps; request id -> its mixture
        self.lora = lora_model(coordinator.runner.model)
        self.pool_ops: collections.deque = collections.deque()
        self.mixtures: dict[str, dict] = {}
        self._thread = threading.Thread(target=self._run, name="tessera-scheduler", daemon=True)
        self._switch_before: float | None = None  # the interpreter's GIL switch interval, while start() changed it

    # --- the interface -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the scheduler thread. It hands the GIL over more often than Python's default (every 5 ms): the
        step's forward pass releases the GIL in every torch call, and while the HTTP event loop turns a step's
        tokens into server-sent events it would take the GIL back for up to 5 ms each time, so the forward (and with
        it every other rank, which waits in its collectives) stalled behind the event loop. Measured on the decode
        benchmark at 64 arrivals/s (2 CPU ranks), 0.2 ms gave about 12 % more tokens/s in alternating runs. That
        was with the HTTP server inside rank 0, where the in-process app still runs (tests, bench_serve_http). The
        served decoder's HTTP server now runs in a process of its own (engine.serving.api_process), and the threads
        that share rank 0's GIL with this one are the pipe's two; the setting was not measured again there."""
        self.step()  # learn every rank's KV capacity before the first request is admitted
        self._switch_before = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread.start()

    def submit(self, request: Request) -> None:
        if not self.healthy:
            raise RankFailure(self.failure or "a worker rank failed")
        if request.kind == "lora":  # a change to the adapter pool (engine.serving.lora_api)
            return self._enqueue(request)
        if request.kind != "generate":
            raise ValueError(f"the continuous scheduler generates; {request.kind!r} requests go to the static one")
        need = self.blocks_needed(request)
        capacity = max(kv["blocks_total"] for kv in self.kv)
        if need > capacity:
            raise RequestTooLarge(f"the prompt ({len(request.token_ids)} tokens) and max_tokens "
                                  f"({request.params['max_tokens']}) need {need} KV blocks of "
                                  f"{self.kv[0]['block_size']} tokens; a rank holds {capacity}")
        request.id = request.id or uuid.uuid4().hex
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            raise Overloaded from None
        self._gauge_waiting()

    async def generate(self, request: Request) -> AsyncIterator[Generation]:
        """Submit `request` (streaming) and yield its new tokens (and their log-probabilities) until it ends."""
        request.stream, request.tokens = True, asyncio.Queue()
        self.submit(request)
        try:
            while True:
                items = [await request.tokens.get()]
                while not request.tokens.empty():
                    items.append(request.tokens.get_nowait())
                pairs = [item for item in items if isinstance(item, tuple)]
                if pairs:
                    entries = [entry for _, entry in pairs]
                    yield Generation([token for token, _ in pairs],
                                     entries if request.params.get("logprobs") is not None else None)
                if isinstance(items[-1], Exception):
                    raise items[-1]
                if items[-1] is None:
                    return
        finally:
            request.cancelled = True  # a consumer that stopped early frees its row at the next step

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, tell the other ranks to stop, and end the thread."""
        self.queue.put(_STOP)
        self._thread.join(timeout)
        if not self._thread.is_alive() and self._switch_before is not None:
            sys.setswitchinterval(self._switch_before)
            self._switch_before = None

    @property
    def queue_depth(self) -> int:
        return self.queue.qsize() + len(self.incoming)

    def blocks_needed(self, request: Request) -> int:
        size = self.kv[0]["block_size"]
        return -(-(len(request.token_ids) + request.params["max_tokens"]) // size)

    # --- the loop ------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not (self.stopping and not self.active and not self.incoming):
                if not self.active and not self.incoming and not self.pool_ops:
                    try:
                        item = self.queue.get(timeout=self.heartbeat_s)
                    except queue.Empty:
                        self.coordinator.execute({"type": "ping"})  # so a dead rank is noticed while idle
                        continue
                    self._take(item)
                self._drain()
                self._apply_pool_ops()
                if self.active or self.incoming:
                    self.step()
            self._apply_pool_ops()  # an unload that waited for the last requests: nothing uses its adapter now
            self.coordinator.stop()
        except RankFailure as err:
            self._fail(str(err))
        except Exception as err:  # rank 0 itself cannot step (its requests' errors come back as events)
            self._fail(f"rank 0's scheduler failed: {type(err).__name__}: {err}")

    def _take(self, item) -> None:
        if item is _STOP:
            self.stopping = True
        elif item.kind == "lora":
            self.pool_ops.append(item)
        elif item.adapter is not None and item.adapter in self._unloading():
            self._finish(item, request_error(404, f"adapter {item.adapter!r} is being unloaded", "adapter"))
        elif not item.cancelled:
            self.incoming.append(item)

    def _drain(self) -> None:
        """Take from the bounded queue only what the ranks have room to run: the rest waits there, so past
        `max_queue` waiting requests the server answers 503 instead of growing a backlog without bound."""
        while len(self.incoming) < self.world * self.max_running_per_rank - len(self.active):
            try:
                self._take(self.queue.get_nowait())
            except queue.Empty:
                return

    def step(self) -> None:
        """One lockstep step of every rank: place new requests, drop cancelled ones, run, deliver tokens."""
        add, cancel = self._place(), self.to_cancel
        self.to_cancel = [[] for _ in range(self.world)]
        for request_id, (request, rank) in list(self.active.items()):
            if request.cancelled:
                cancel[rank].append(request_id)
                del self.active[request_id]
        # whether a request can start on some rank (an encoder-decoder batch encodes only then): one placed now, or
        # one that waited there at the last step
        encode = any(add) or any(kv.get("waiting", 0) for kv in self.kv)
        results = self.coordinator.execute({"type": "step", "add": add, "cancel": cancel, "encode": encode})
        now = time.perf_counter()
        self.kv = [result["kv"] for result in results]
        if self.metrics is not None:  # before answering: a client that then reads /metrics sees this step
            self.metrics.record_results(results)
            self.metrics.record_kv(self.kv, waiting=self.queue_depth)
        self._outbox = {}
        try:
            for result in results:
                for event in result["events"]:
                    self._deliver(event, now)
        finally:
            outbox, self._outbox = self._outbox, None
            for loop, calls in outbox.items():
                _post_all(loop, calls)

    def _place(self) -> list[list[dict]]:
        """New requests to a rank whose free KV blocks hold them (counting what this step already placed): of those,
        the one with the fewest prompt tokens not yet answered, else the one with the most free blocks. A rank that
        prefills makes every rank wait for it in the MoE collectives, so spreading the prefill evens the lockstep
        steps out; on the decode benchmark at 128/s (saturated) this streamed 5-8 % more tokens/s than placing by free
        blocks alone, at 64/s no difference showed (benchmarks/results/placement_ab_cpu/)."""
        add = [[] for _ in range(self.world)]
        free = [kv["blocks_free"] for kv in self.kv] if self.kv else [0] * self.world
        running, prefill = [0] * self.world, [0] * self.world  # requests, and prompt tokens not yet answered
        for request, rank in self.active.values():
            running[rank] += 1
            if request.first_token_at is None:
                prefill[rank] += len(request.token_ids)
        in_use, held = self._adapters_in_use(), []
        while self.incoming:
            request = self.incoming[0]
            if request.cancelled:
                self.incoming.popleft()
                self._finish(request, None)
                continue
            open_ranks = [r for r in range(self.world) if running[r] < self.max_running_per_rank]
            if not open_ranks:
                break  # every rank has enough to do: the rest waits here, still placeable anywhere
            ranks = self._ranks_with_adapter_room(request, open_ranks, in_use, held)
            if isinstance(ranks, Exception):
                self._finish(self.incoming.popleft(), ranks)
                continue
            if not ranks:
                held.append(self.incoming.popleft())
                continue
            need = self.blocks_needed(request)
            roomy = [r for r in ranks if free[r] >= need] or [max(ranks, key=lambda r: free[r])]
            rank = min(roomy, key=lambda r: (prefill[r], -free[r], running[r]))
            self.incoming.popleft()
            free[rank] -= need
            running[rank] += 1
            prefill[rank] += len(request.token_ids)
            self.active[request.id] = (request, rank)
            p = request.params
            add[rank].append(dict(request_id=request.id, token_ids=request.token_ids, max_tokens=p["max_tokens"],
                                  temperature=p.get("temperature", 0.0), top_p=p.get("top_p", 1.0),
                                  seed=p.get("seed"), presence_penalty=p.get("presence_penalty", 0.0),
                                  frequency_penalty=p.get("frequency_penalty", 0.0), logprobs=p.get("logprobs"),
                                  adapters=self._request_mixture(request)))
            in_use[rank].update(self._request_mixture(request))
        self.incoming.extendleft(reversed(held))  # they keep their place at the front
        self._gauge_waiting()
        return add

    def _mixture(self, request: Request) -> dict:
        """A request's adapter mixture: none, its named adapter, or the router's choice for its prompt."""
        if request.adapter is None:
            return {}
        if request.adapter == "auto":
            return dict(self.router.route([request.text])[0].adapters)
        return {request.adapter: 1.0}

    # --- a LoRA pool: the device budget and run-time loads and unloads -----------------------------------------

    def _request_mixture(self, request: Request) -> dict:
        """The request's adapter mixture, worked out (routed) once; an adapter being unloaded takes no new share."""
        if request.id not in self.mixtures:
            unloading = self._unloading()
            self.mixtures[request.id] = {n: w for n, w in self._mixture(request).items()
                                         if n not in unloading or n == request.adapter}
        return self.mixtures[request.id]

    def _adapters_in_use(self) -> list[set]:
        """Per rank, the adapters its running requests use (and forget the mixtures of requests gone)."""
        live = self.active.keys() | {request.id for request in self.incoming}
        self.mixtures = {rid: mix for rid, mix in self.mixtures.items() if rid in live}
        in_use = [set() for _ in range(self.world)]
        for request_id, (_, rank) in self.active.items():
            in_use[rank].update(self.mixtures.get(request_id, ()))
        return in_use

    def _ranks_with_adapter_room(self, request: Request, open_ranks: list[int], in_use: list[set], held: list):
        """The open ranks whose device adapter cache holds this request's adapters beside those of the requests
        already there, as vLLM's max_loras does per step; or the error that it can never run. Once a request waits
        for room, every later request that needs an adapter waits behind it, so adapters take turns first come
        first served and none starves; base-model requests go on. When the budget does not hold the whole pool,
        ranks that already hold the request's adapters come first, which leaves room elsewhere for others."""
        mixture = self._request_mixture(request)
        if not mixture:
            return open_ranks
        if held:
            return []
        error = unknown_or_too_large(mixture, self.lora)
        if error is not None:
            return error
        capacity = self.lora.cache.capacity
        ranks = [r for r in open_ranks if len(in_use[r] | mixture.keys()) <= capacity]
        if ranks and capacity < len(self.lora.pool):
            fewest = min(len(mixture.keys() - in_use[r]) for r in ranks)
            ranks = [r for r in ranks if len(mixture.keys() - in_use[r]) == fewest]
        return ranks

    def _unloading(self) -> set[str]:
        return {item.params["name"] for item in self.pool_ops if item.params["type"] == "lora_unload"}

    def _apply_pool_ops(self) -> None:
        """Adapter loads and unloads in the order they came, on every rank, between two steps. An unload waits
        (and the changes behind it with it) until no running or waiting request uses its adapter."""
        while self.pool_ops:
            item = self.pool_ops[0]
            op = item.params
            if op["type"] == "lora_unload" and self._uses(op["name"]):
                return
            self.pool_ops.popleft()
            if op["type"] == "lora_load" and self.lora is not None:
                running = max(len(names) for names in self._adapters_in_use())
                result = load_between_steps(self.coordinator, self.lora, op, running, getattr(self.router, "k", 0))
            else:
                result = apply_everywhere(self.coordinator, op)
            self._finish(item, result)

    def _uses(self, name: str) -> bool:
        ids = [*self.active, *(request.id for request in self.incoming)]
        return any(request.adapter == name for request in self.incoming) or \
            any(name in self.mixtures.get(request_id, ()) for request_id in ids)

    def _deliver(self, event: dict, now: float) -> None:
        entry = self.active.get(event["id"])
        if entry is None:  # dropped at rank 0 meanwhile
            return
        request, rank = entry
        tokens = event["tokens"]
        if tokens and request.first_token_at is None:
            request.first_token_at = now
            if self.metrics is not None:
                self.metrics.time_to_first_token.observe(now - request.enqueued_at)
        finish = event["finish"]
        if tokens and request.stop:
            text = self.tokenizer.decode(request.generated + tokens)
            if any(s and s in text for s in request.stop):
                finish = finish or "stop"
                if event["finish"] is None:
                    self.to_cancel[rank].append(request.id)  # leaves its rank's batch at the next step
        entries = event["logprobs"] or [None] * len(tokens)
        request.generated.extend(tokens)
        request.entries.extend(entries)
        if request.stream:
            for pair in zip(tokens, entries):
                self._post(request, request.tokens.put_nowait, pair)
        if self.metrics is not None:
            self.metrics.tokens_out.inc(len(tokens))
        if finish is None:
            return
        del self.active[request.id]
        if event["error"] is not None:
            self._finish(request, StepFailure(f"generation step failed on rank {rank}: {event['error']}"))
            return
        if self.metrics is not None and request.first_token_at is not None and len(request.generated) > 1:
            self.metrics.time_per_output_token.observe((now - request.first_token_at) / (len(request.generated) - 1))
        request.finish_reason = finish
        wanted = request.params.get("logprobs") is not None
        self._finish(request, Generation(list(request.generated), list(request.entries) if wanted else None))

    def _finish(self, request: Request, value) -> None:
        """Hand the end of a request to its client: None/exception after the streamed tokens, else the result."""
        if request.loop is None:  # offline (generate_batch)
            request.result = value
            return
        if request.stream:
            end = value if isinstance(value, Exception) else None
            self._post(request, request.tokens.put_nowait, end)
        elif request.future is not None:
            setter = request.future.set_exception if isinstance(value, Exception) else request.future.set_result
            self._post(request, lambda: request.future.done() or setter(value))

    def _post(self, request: Request, fn, *args) -> None:
        """Run `fn(*args)` on the request's event loop: during a step's delivery, gathered per loop and handed over
        in one call after it (one wake-up of the loop per step, not one per request and token), in order."""
        if self._outbox is None:
            _post_all(request.loop, [(request, fn, args)])
        else:
            self._outbox.setdefault(request.loop, []).append((request, fn, args))

    def _gauge_waiting(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue_depth)

    def _fail(self, message: str) -> None:
        """A rank is gone: report unhealthy, fail everything in flight, and exit non-zero shortly after."""
        self.healthy, self.failure = False, message
        if self.metrics is not None:
            self.metrics.healthy.set(0)
        fail_and_exit(message, [request for request, _ in self.active.values()] + list(self.incoming) +
                      list(self.pool_ops), self.queue, self._finish)


def _post_all(loop, calls: list) -> None:
    """Run each `fn(*args)` of `calls` on `loop`, in order; a loop that has closed (its clients are gone for good)
    only marks their requests cancelled, so they leave their ranks' batches at the next step."""
    def run():  # each its own callback, as before, so one that raises leaves the others to run
        for _, fn, args in calls:
            loop.call_soon(fn, *args)

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:  # "Event loop is closed"
        for request, _, _ in calls:
            request.cancelled = True


class _LocalRunner:
    """The one rank of an offline run: steps the RankBatch directly."""

    def __init__(self, batch):
        self.batch, self.model = batch, batch.model

    def run(self, op: dict, *_streaming) -> dict:
        return self.batch.run(op, rank=0)


def batch_class(model):
    """The running batch of one rank: over transformers' paged cache for decoders, over a slab of self- and
    cross-attention caches for encoder-decoders (the paged cache has no cross-attention)."""
    if model.config.is_encoder_decoder:
        from engine.serving.encdec_batch import EncDecBatch

        return EncDecBatch
    from engine.serving.paged_batch import RankBatch

    return RankBatch


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int | None = None, *, adapters: list[str | None] | None = None,
                   kv_bytes: int | None = None, kv_fraction: float = 0.5, block_size: int = 32,
                   step_tokens: int = 256, max_running: int = 64) -> list[list[int]]:
    """Offline continuous batching on one process with the server's scheduler: every prompt's new tokens (EOS
    excluded). Request i samples with seed `seed + i` when `temperature > 0`. `adapters`: per prompt, the name of
    an adapter in the model's LoRA pool, or None for the base model (as a server request's `adapter`)."""
    from engine.serving.paged_batch import kv_blocks_for_budget

    if adapters is not None:
        pool = getattr(lora_model(model), "pool", None)
        if len(adapters) != len(prompts):
            raise ValueError(f"adapters has {len(adapters)} entries for {len(prompts)} prompts")
        unknown = sorted({name for name in adapters if name is not None and (pool is None or name not in pool)})
        if unknown:
            raise ValueError(f"adapters {unknown} are not in the model's LoRA pool "
                             f"{sorted(pool) if pool is not None else '(the model has none)'}")

    longest = max(len(p) for p in prompts) + max_new_tokens
    blocks = kv_blocks_for_budget(model, block_size, kv_bytes, kv_fraction,
                                  most_useful=min(max_running, len(prompts)) * -(-longest // block_size))
    batch = batch_class(model)(model, num_blocks=blocks, block_size=block_size, step_tokens=step_tokens,
                               max_requests=max_running)
    engine = ContinuousEngine(Coordinator(_LocalRunner(batch), world=1), max_queue=len(prompts) + 1,
                              max_running_per_rank=max_running)
    try:
        engine.step()
        requests = []
        for i, ids in enumerate(prompts):
            params = dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          seed=None if seed is None else seed + i)
            request = Request("generate", list(ids), None, params=params,
                              adapter=None if adapters is None else adapters[i])
            requests.append(request)
            engine.submit(request)
        while engine.active or engine.incoming or not engine.queue.empty():
            engine._drain()
            engine.step()
    finally:
        batch.close()
    for request in requests:
        if isinstance(request.result, Exception):
            raise request.result
    return [request.result.tokens for request in requests]

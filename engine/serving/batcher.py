"""Dynamic batching on rank 0: a bounded queue of requests, a thread that forms batches (up to a token and a
sequence budget, waiting at most `max_wait_ms` for company) and runs them on all ranks.

The queue is bounded, so memory does not grow with load: a full queue is answered 503 at once. A streaming
request is placed on rank 0, whose generation loop hands each new token to the client as it is made; other
requests are spread over the ranks by prompt tokens, longest first. A client that goes away is marked cancelled:
its slot is freed at once and its row stops generating at the next step.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from engine.serving.coordinator import Coordinator, RankFailure
from engine.serving.lora_api import run_pool_op, sub_batches
from engine.serving.metrics import Metrics

_STOP = object()


class Overloaded(Exception):
    pass


@dataclass
class Request:
    kind: str  # "embed" or "generate"
    token_ids: list[int]
    loop: asyncio.AbstractEventLoop
    # generate: max_tokens, temperature, top_p, seed (None: unseeded); optional presence_penalty,
    # frequency_penalty, logprobs (how many alternatives per token; None: no log-probabilities)
    params: dict = field(default_factory=dict)
    text: str = ""
    adapter: str | None = None  # None: the base model; "auto": the router decides; else an adapter name
    stop: list[str] = field(default_factory=list)  # stop strings (the caller cuts the text at them)
    stream: bool = False
    future: asyncio.Future | None = None  # not streaming: set to a `Generation`
    tokens: asyncio.Queue | None = None  # streaming: (token id, logprob entry or None) per step, then None
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    # continuous scheduler (engine.serving.scheduler): it also ends generation at the step a stop string appears
    id: str = ""
    generated: list[int] = field(default_factory=list)
    entries: list = field(default_factory=list)  # log-probability entries of `generated`, when asked for
    finish_reason: str | None = None
    result: object = None  # offline requests (no event loop): the Generation, or the exception

    def penalties(self) -> tuple[float, float]:
        return self.params.get("presence_penalty", 0.0), self.params.get("frequency_penalty", 0.0)

    def batch_key(self):
        if self.kind != "generate":  # "embed", or "lora": a change to the adapter pool (engine.serving.lora_api)
            return (self.kind,)
        sampling = self.params["temperature"] > 0  # a batch samples with one seed: requests with others wait
        return ("generate", self.params["temperature"], self.params["top_p"], self.params["seed"] if sampling else 0)


class BatchEngine:
    def __init__(self, coordinator: Coordinator, config, metrics: Metrics, router=None):
        self.coordinator, self.config, self.metrics, self.router = coordinator, config, metrics, router
        self.world = coordinator.world
        self.queue: queue.Queue = queue.Queue(maxsize=config.max_queue)
        self.held: collections.deque = collections.deque()  # taken from the queue, waiting for a fitting batch
        self.healthy = True
        self.failure: str | None = None
        self._inflight: list[Request] = []
        self._thread = threading.Thread(target=self._run, name="tessera-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        if not self.healthy:
            raise RankFailure(self.failure or "a worker rank failed")
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            raise Overloaded from None
        self.metrics.queue_depth.set(self.queue_depth)

    @property
    def queue_depth(self) -> int:
        return self.queue.qsize() + len(self.held)

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, tell the other ranks to stop, and end the thread."""
        self.queue.put(_STOP)
        self._thread.join(timeout)

    def _next(self, timeout: float):
        if self.held:
            return self.held.popleft()
        return self.queue.get(timeout=timeout)

    def _run(self) -> None:
        try:
            while True:
                try:
                    first = self._next(self.config.heartbeat_s)
                except queue.Empty:
                    self.coordinator.execute({"type": "ping"})
                    continue
                if first is _STOP:
                    break
                if first.cancelled:
                    continue
                if first.kind == "lora":  # between batches, on every rank
                    self._finish(first, run_pool_op(self, first.params))
                    continue
                batch = self._collect(first)
                self.metrics.queue_depth.set(self.queue_depth)
                self._execute(batch)
            self.coordinator.stop()
        except RankFailure as err:
            self._fail(str(err))

    def _collect(self, first: Request) -> list[Request]:
        batch, tokens = [first], len(first.token_ids)
        deadline = time.perf_counter() + self.config.max_wait_ms / 1e3
        while len(batch) < self.config.max_batch_size:
            try:
                request = self.queue.get(timeout=max(deadline - time.perf_counter(), 0))
            except queue.Empty:
                break
            if request is _STOP:
                self.held.append(request)
                break
            if request.cancelled:
                continue
            if request.batch_key() != first.batch_key() or tokens + len(request.token_ids) > self.config.max_batch_tokens:
                self.held.append(request)
                break
            batch.append(request)
            tokens += len(request.token_ids)
        return batch

    def _assign(self, batch: list[Request]) -> list[list[int]]:
        """Row indices per rank: streaming rows on rank 0, the rest longest-first to the least-loaded rank."""
        world = self.coordinator.world
        shares, load = [[] for _ in range(world)], [0] * world
        order = sorted(range(len(batch)), key=lambda i: (not batch[i].stream, -len(batch[i].token_ids)))
        for i in order:
            rank = 0 if batch[i].stream else min(range(world), key=lambda r: load[r])
            shares[rank].append(i)
            load[rank] += len(batch[i].token_ids)
        return shares

    def _execute(self, batch: list[Request]) -> None:
        if batch[0].kind == "generate" and any(r.adapter for r in batch):
            # as many sub-batches as the device budget for adapters needs (engine.serving.lora_api)
            parts, rejected = sub_batches(batch, self._adapter_mixtures(batch), self.coordinator.runner.model)
            for request, err in rejected:
                self._finish(request, err)
            for part in parts:
                self._execute_part([r for r, _ in part], [m for _, m in part])
        else:
            self._execute_part(batch, None)

    def _execute_part(self, batch: list[Request], mixtures: list[dict] | None) -> None:
        shares = self._assign(batch)
        work = [[batch[i].token_ids for i in share] for share in shares]
        op = {"type": batch[0].kind, "work": work}
        streamer = cancelled = None
        if batch[0].kind == "generate":
            limits = [[batch[i].params["max_tokens"] for i in share] for share in shares]
            if mixtures is not None:
                op["adapters"] = [[mixtures[i] for i in share] for share in shares]
            penalties = [[batch[i].penalties() for i in share] for share in shares]
            if any(p != (0.0, 0.0) for share in penalties for p in share):
                op["penalties"] = penalties
            if any(r.params.get("logprobs") is not None for r in batch):
                op["logprobs"] = [[batch[i].params.get("logprobs") for i in share] for share in shares]
            op.update(limits=limits, params=dict(max_new_tokens=max(map(max, filter(None, limits))),
                                                 temperature=batch[0].params["temperature"],
                                                 top_p=batch[0].params["top_p"], seed=batch[0].params["seed"]))
            local = [batch[i] for i in shares[0]]
            cancelled = lambda: [r.cancelled for r in local]  # noqa: E731
            streamer = lambda step, finished, entries: self._stream_step(local, step, finished, entries)  # noqa: E731
        self.metrics.batch_size.observe(len(batch))
        prompt_tokens = sum(len(r.token_ids) for r in batch)
        self.metrics.batch_tokens.observe(prompt_tokens)
        self.metrics.tokens_in.inc(prompt_tokens)
        self._inflight = batch
        try:
            results = self.coordinator.execute(op, streamer, cancelled)
        except RankFailure:
            raise
        except Exception as err:  # a bad batch fails its requests, not the server
            for request in batch:
                self._finish(request, err)
            return
        self.metrics.record_results(results)
        key = "embeddings" if op["type"] == "embed" else "tokens"
        for share, result in zip(shares, results):
            for i, value in zip(share, result[key]):
                if op["type"] == "generate":
                    self.metrics.tokens_out.inc(len(value.tokens))
                self._finish(batch[i], value)

    def _adapter_mixtures(self, batch: list[Request]) -> list[dict]:
        """Each row's adapter mixture: named adapters as they are, "auto" rows routed together here on rank 0."""
        mixtures = [{} if r.adapter in (None, "auto") else {r.adapter: 1.0} for r in batch]
        auto = [i for i, r in enumerate(batch) if r.adapter == "auto"]
        if auto:
            for i, decision in zip(auto, self.router.route([batch[i].text for i in auto])):
                mixtures[i] = dict(decision.adapters)
        return mixtures

    def _stream_step(self, requests: list[Request], step: list, finished: list[bool], entries: list | None) -> None:
        """Hands each streaming row its token of this step; a row that ends (end-of-sequence) ends its stream now,
        not when the batch ends, and a row that ended earlier (None) gets nothing."""
        now = time.perf_counter()
        for row, (request, token) in enumerate(zip(requests, step)):
            if token is None or not request.stream or request.cancelled:
                continue
            if finished[row]:
                _post(request, request.tokens.put_nowait, None)
                continue
            if request.first_token_at is None:
                request.first_token_at = now
                self.metrics.time_to_first_token.observe(now - request.enqueued_at)
            _post(request, request.tokens.put_nowait, (token, entries and entries[row]))

    def _finish(self, request: Request, value) -> None:
        if request.stream:
            _post(request, request.tokens.put_nowait, value if isinstance(value, Exception) else None)
        elif not request.future.done():
            setter = request.future.set_exception if isinstance(value, Exception) else request.future.set_result
            _post(request, lambda: request.future.done() or setter(value))

    def _fail(self, message: str) -> None:
        """A rank is gone: report unhealthy, fail everything waiting, and exit non-zero shortly after."""
        self.healthy, self.failure = False, message
        self.metrics.healthy.set(0)
        fail_and_exit(message, self._inflight + list(self.held), self.queue, self._finish)


async def submitted(engine, request: Request) -> None:
    """`engine.submit(request)`, awaited where it returns an awaitable (the API process's client of rank 0 waits
    for rank 0 to admit the request); raises what a refusal raises."""
    admitted = engine.submit(request)
    if inspect.isawaitable(admitted):
        await admitted


def _post(request: Request, fn, *args) -> None:
    """Run `fn(*args)` on the request's event loop; a loop that has closed (its client is gone for good) only
    marks the request cancelled, so the batcher thread never dies on it."""
    try:
        request.loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # "Event loop is closed"
        request.cancelled = True


def fail_and_exit(message: str, pending: list, waiting: queue.Queue, finish) -> None:
    """A rank is gone: `finish(request, RankFailure)` for every request pending or waiting, then exit non-zero
    in 2 s (time for the answers to go out)."""
    error = RankFailure(message)
    while not waiting.empty():
        pending.append(waiting.get_nowait())
    for request in pending:
        if isinstance(request, Request):  # not a stop marker
            finish(request, error)
    print(f"tessera serve: {message}; exiting", flush=True)
    threading.Timer(2.0, lambda: os._exit(1)).start()

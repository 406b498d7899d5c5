"""The HTTP API in a process of its own beside rank 0, as vLLM runs its API server apart from its engine core.

In one process, the event loop that parses requests and writes server-sent events shares rank 0's GIL with the
scheduler thread that steps every rank, and every other rank waits in its collectives while rank 0's step waits
for the GIL. On the decode benchmark (2 CPU ranks, 64 arrivals/s; benchmarks/results/halves_cpu/) the ranks alone
made 5463 tokens/s, the HTTP half alone over a model-free step 5741, and the two together in one process 2696.

Rank 0 starts this process (`python -m engine.serving.api_process FD`) and the two talk over one socket pair, in
pickled messages:

    API -> rank 0:  ("submit", id, request fields)   ("cancel", [ids])   ("metrics", query)
    rank 0 -> API:  ("start", settings)   ("ack", id, refusal or None)   ("out", deliveries, state)
                    ("metrics", query, rank 0's exposition)   ("drain",)

- Rank 0's scheduler delivers tokens and ends through `RankZeroBridge`, which stands in for the requests' event
  loop: what one step delivers is one "out" message, written by a thread of its own so that the scheduler never
  waits on the pipe.
- The API process admits nothing by itself: each submit waits for rank 0's answer, so a full queue (503) and a
  request over a rank's KV cache (413) are refused exactly as in one process.
- A client that goes away marks its request cancelled; the next "out" message the API process reads sends the
  cancellations, and the requests leave their ranks at the next step.
- SIGTERM or SIGINT on rank 0 becomes "drain": the API process stops accepting, lets its requests finish (rank 0
  keeps stepping) and exits; rank 0 then stops the ranks. If rank 0 goes (the pipe closes), the API process fails
  what is in flight with 503 and exits non-zero; if the API process goes, rank 0 stops the ranks and exits
  non-zero.

Encoders (embeddings) and the static batcher keep the HTTP server inside rank 0.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import uuid
from multiprocessing.connection import Connection
from pathlib import Path

from engine.serving.batcher import Request
from engine.serving.coordinator import RankFailure

_FIELDS = ("kind", "token_ids", "params", "text", "adapter", "stop", "stream", "enqueued_at")
# torchrun's settings for its workers: the API process is none of them
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                   "MASTER_ADDR", "MASTER_PORT")


# ---- rank 0 -------------------------------------------------------------------------------------------------
class RankZeroBridge:
    """Rank 0's end of the pipe: turns the API process's messages into the engine's requests, and the engine's
    deliveries (made on its scheduler thread, through this object as their `loop`) into messages."""

    def __init__(self, engine, metrics, adapter_names):
        self.engine, self.metrics, self.adapter_names = engine, metrics, adapter_names
        self.requests: dict[str, Request] = {}  # id -> the request, until it ends or is cancelled
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._delivered: list | None = None
        self._lock = threading.Lock()
        self._adapters_sent = None
        self.conn: Connection | None = None

    def launch(self, settings: dict) -> subprocess.Popen:
        """Start the API process and send it `settings` (its ServeConfig among them: the API key does not show in
        `ps`); returns the process."""
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])
        env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        env["CUDA_VISIBLE_DEVICES"] = ""  # it serves HTTP: no GPU memory for it
        process = subprocess.Popen([sys.executable, "-m", "engine.serving.api_process", str(theirs.fileno())],
                                   pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.connect(Connection(ours.detach()), settings)
        return process

    def connect(self, conn: Connection, settings: dict) -> None:
        """Send `settings` over `conn` and start serving it: the API process is at its other end."""
        self.conn, self._adapters_sent = conn, self._adapters()
        self.conn.send(("start", {**settings, "adapters": self._adapters_sent}))
        threading.Thread(target=self._send_loop, name="tessera-api-send", daemon=True).start()
        threading.Thread(target=self._receive_loop, name="tessera-api-receive", daemon=True).start()

    def drain(self) -> None:
        self.outbox.put(("drain",))

    # -- as the requests' event loop (engine.serving.scheduler._post_all), on the scheduler thread --

    def call_soon_threadsafe(self, fn, *args) -> None:
        """One hand-over of deliveries (a whole step's): run it now and send what it delivered as one message."""
        with self._lock:
            self._delivered = []
            try:
                fn(*args)
            finally:
                delivered, self._delivered = self._delivered, None
        self.outbox.put(("out", delivered, self._state()))

    def call_soon(self, fn, *args) -> None:
        fn(*args)

    def deliver(self, request_id: str, value, last: bool) -> None:
        self._delivered.append((request_id, _portable(value)))
        if last:
            self.requests.pop(request_id, None)

    def _state(self) -> dict:
        engine = self.engine
        state = {"healthy": engine.healthy, "failure": engine.failure, "queue_depth": engine.queue_depth}
        adapters = self._adapters()
        if adapters != self._adapters_sent:  # after a load or an unload
            state["adapters"] = self._adapters_sent = adapters
        return state

    def _adapters(self) -> list[str] | None:
        return None if self.adapter_names is None else list(self.adapter_names())

    # -- the pipe --

    def _send_loop(self) -> None:
        while True:
            message = self.outbox.get()
            try:
                self.conn.send(message)
            except OSError:  # the API process is gone; rank 0's main thread sees it exit
                return

    def _receive_loop(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "submit":
                self._submit(message[1], message[2])
            elif message[0] == "cancel":
                for request_id in message[1]:
                    request = self.requests.pop(request_id, None)
                    if request is not None:
                        request.cancelled = True
            elif message[0] == "metrics":
                self.outbox.put(("metrics", message[1], self.metrics.render()))
        for request in list(self.requests.values()):  # nobody reads them any more
            request.cancelled = True

    def _submit(self, request_id: str, fields: dict) -> None:
        request = Request(loop=self, id=request_id, **fields)
        if request.stream:
            request.tokens = _Stream(self, request_id)
        else:
            request.future = _Future(self, request_id)
        self.requests[request_id] = request
        try:
            self.engine.submit(request)
            refusal = None
        except Exception as err:  # Overloaded, RequestTooLarge, RankFailure: the API process raises it
            refusal = _portable(err)
            self.requests.pop(request_id, None)
        self.outbox.put(("ack", request_id, refusal))


def _portable(value):
    """`value`, or for an exception that would not survive pickling (one whose constructor takes other arguments
    than it passes on), a RuntimeError that says the same: a message the API process cannot read would leave its
    request waiting for ever."""
    if not isinstance(value, Exception):
        return value
    try:
        pickle.loads(pickle.dumps(value))
        return value
    except Exception:
        return RuntimeError(f"{type(value).__name__}: {value}")


class _Stream:
    """A streaming request's `tokens` on rank 0: (token, logprob entry) pairs, then None or the exception."""

    def __init__(self, bridge: RankZeroBridge, request_id: str):
        self.bridge, self.request_id = bridge, request_id

    def put_nowait(self, item) -> None:
        self.bridge.deliver(self.request_id, item, last=not isinstance(item, tuple))


class _Future:
    """A whole request's `future` on rank 0: its Generation (a LoRA change's result dict), or the exception."""

    def __init__(self, bridge: RankZeroBridge, request_id: str):
        self.bridge, self.request_id, self._done = bridge, request_id, False

    def done(self) -> bool:
        return self._done

    def set_result(self, value) -> None:
        self._done = True
        self.bridge.deliver(self.request_id, value, last=True)

    set_exception = set_result


# ---- the API process ----------------------------------------------------------------------------------------
class EngineClient:
    """Rank 0's engine as the HTTP app sees it (engine.serving.app's backend), over the pipe."""

    def __init__(self, conn: Connection, settings: dict):
        self.conn = conn
        self.world = settings["world"]
        self.router = settings["router"]  # rank 0 routes "auto"; here only whether it can (None: it cannot)
        self.adapters: list[str] | None = settings["adapters"]
        self.healthy, self.failure, self.queue_depth = True, None, 0
        self.requests: dict[str, Request] = {}  # submitted, not yet ended or cancelled
        self.acks: dict[str, asyncio.Future] = {}
        self.queries: dict[int, asyncio.Future] = {}
        self._query_ids = itertools.count()
        self.on_drain = self.on_gone = lambda: None  # rank 0 says "drain"; rank 0 is gone
        self.loop: asyncio.AbstractEventLoop | None = None
        self.rank_zero_gone = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.conn.fileno(), self._readable)

    async def submit(self, request: Request) -> None:
        """Send `request` to rank 0 and return once it is admitted; raises its refusal (Overloaded,
        RequestTooLarge, RankFailure) as the engine's own submit does."""
        if not self.healthy:
            raise RankFailure(self.failure or "rank 0 is gone")
        request.id = request.id or uuid.uuid4().hex
        ack = self.loop.create_future()
        self.acks[request.id], self.requests[request.id] = ack, request
        self._send(("submit", request.id, {name: getattr(request, name) for name in _FIELDS}))
        try:
            refusal = await ack
        except BaseException:
            request.cancelled = True
            raise
        if refusal is not None:
            self.requests.pop(request.id, None)
            raise refusal

    async def engine_metrics(self) -> bytes:
        """Rank 0's part of /metrics (the scheduler's and the ranks' families)."""
        if self.rank_zero_gone:
            return b""
        query = next(self._query_ids)
        self.queries[query] = answer = self.loop.create_future()
        self._send(("metrics", query))
        return await asyncio.wait_for(answer, timeout=30)

    def _send(self, message) -> None:
        try:
            self.conn.send(message)
        except OSError:
            self._rank_zero_gone()
            raise RankFailure(self.failure) from None

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            self._rank_zero_gone()

    def _handle(self, message) -> None:
        kind = message[0]
        if kind == "out":
            _, delivered, state = message
            self.healthy, self.failure, self.queue_depth = state["healthy"], state["failure"], state["queue_depth"]
            self.adapters = state.get("adapters", self.adapters)
            for request_id, value in delivered:
                request = self.requests.get(request_id)
                if request is not None:
                    self._deliver(request, value)
            cancelled = [request_id for request_id, request in self.requests.items() if request.cancelled]
            if cancelled:
                for request_id in cancelled:
                    del self.requests[request_id]
                try:
                    self._send(("cancel", cancelled))
                except RankFailure:  # rank 0 is gone, and _send has failed what was in flight
                    pass
        elif kind == "ack":
            ack = self.acks.pop(message[1], None)
            if ack is not None and not ack.done():
                ack.set_result(message[2])
        elif kind == "metrics":
            answer = self.queries.pop(message[1], None)
            if answer is not None and not answer.done():
                answer.set_result(message[2])
        elif kind == "drain":
            self.on_drain()

    def _deliver(self, request: Request, value) -> None:
        if request.stream:
            request.tokens.put_nowait(value)
            if isinstance(value, tuple):
                return
        elif not request.future.done():
            (request.future.set_exception if isinstance(value, Exception) else request.future.set_result)(value)
        self.requests.pop(request.id, None)

    def _rank_zero_gone(self) -> None:
        """Rank 0 exited: fail everything in flight with 503 (RankFailure), then `on_gone`."""
        if self.rank_zero_gone:
            return
        self.rank_zero_gone = True
        if self.loop is not None:
            self.loop.remove_reader(self.conn.fileno())
        self.healthy, self.failure = False, "rank 0 exited: the server cannot go on"
        error = RankFailure(self.failure)
        for request in list(self.requests.values()):
            self._deliver(request, error)
        for ack in self.acks.values():
            ack.done() or ack.set_result(error)
        for answer in self.queries.values():
            answer.done() or answer.set_exception(error)
        self.acks.clear()
        self.queries.clear()
        self.on_gone()


def http_server(app, config):
    """uvicorn, with SIGTERM and SIGINT meaning: finish the requests in flight, then return from `run()`/`serve()`.
    uvicorn re-raises the signal after its graceful shutdown, which would end the process with -15 or a
    KeyboardInterrupt before rank 0 has told the other ranks to stop, so it is taken out of uvicorn's list."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", [])
            while sig in captured:
                captured.remove(sig)

    return DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                         timeout_graceful_shutdown=config.drain_timeout_s))


def serving_line(config, kind: str, world: int) -> str:
    return (f"tessera serving {config.model} ({kind}) on http://{config.host}:{config.port} with {world} rank(s)"
            f"{', API key required' if config.api_key else ''}")


def main(argv: list[str]) -> int:
    from engine.serving.app import create_app
    from engine.serving.lora_api import AdapterNames, mount
    from engine.serving.metrics import Metrics
    from engine.serving.tokenizer import load_tokenizer

    conn = Connection(int(argv[0]))
    _, settings = conn.recv()
    config = settings["config"]
    tokenizer = load_tokenizer(settings["tokenizer_folder"], settings["vocab_size"], config.chat_template)
    client = EngineClient(conn, settings)
    metrics = Metrics(engine=False)
    metrics.remote = client.engine_metrics
    names = AdapterNames(None if client.adapters is None else lambda: client.adapters)
    app = create_app(client, config, tokenizer, config.model, settings["kind"], metrics, names,
                     settings["context_length"])
    mount(app, client, names, config.model)
    server = http_server(app, config)
    client.on_drain = lambda: setattr(server, "should_exit", True)

    def rank_zero_gone():  # stop serving, and exit non-zero in 2 s (time for the answers to go out)
        print(f"tessera api: {client.failure}; exiting", flush=True)
        server.should_exit = True
        threading.Timer(2.0, lambda: os._exit(1)).start()

    client.on_gone = rank_zero_gone

    async def serve():
        client.attach(asyncio.get_running_loop())
        await server.serve()

    print(serving_line(config, settings["kind"], client.world), flush=True)
    with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
        runner.run(serve())
    return 0 if client.healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The HTTP API (FastAPI): OpenAI's /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models, plus
/health and /metrics.

Errors come back as JSON `{"error": {"message", "type", "param"}}`: 400 for malformed JSON or a bad or unknown
field (the field is named), 401 without the server's API key, 404 for a model not served here, 413 for an input
over the limit or a prompt that does not fit the model's context, 500 naming the error when generation failed,
503 with Retry-After when the queue is full or a rank failed.

The backend is anything with `submit(Request)`, `healthy`, `failure`, `router`, `world` and `queue_depth`
(`engine.serving.scheduler.ContinuousEngine` for generation, `engine.serving.batcher.BatchEngine` for the rest, or
`engine.serving.api_process.EngineClient`, rank 0's engine seen from an API server in a process of its own): it
sets a request's future to a `Generation`, or, streaming, puts `(token id, logprob entry or None)` per token on
`request.tokens`, then None or an exception. Its `submit` may return an awaitable (the client's does: rank 0
admits or refuses the request), which raises what a refusal raises.
"""
from __future__ import annotations

import asyncio
import hmac
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.serving.batcher import Overloaded, Request, submitted
from engine.serving.coordinator import RankFailure
from engine.serving.openai_protocol import (APIError, ChatCompletionRequest, ChatShape, CompletionRequest,
                                            CompletionShape, EmbeddingRequest, TextEvent, TextStream, sse, usage)
from engine.serving.scheduler import RequestTooLarge, StepFailure
from engine.serving.tokenizer import NoChatTemplate


def create_app(engine, config, tokenizer, model_name: str, model_kind: str, metrics,
               adapter_names: frozenset = frozenset(), context_length: int | None = None) -> FastAPI:
    """`context_length`: prompt plus completion tokens the model can attend to (None: no limit).

    `app.state.adapter_names()` says which adapters requests may name, and /v1/models lists them: a server whose
    adapter pool changes while it runs replaces it with a function that reads the pool."""
    app = FastAPI(title="tessera", version="0.1.0")
    app.state.adapter_names = lambda: adapter_names
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, err: RequestValidationError):
        errors = err.errors()
        if errors[0]["type"] == "json_invalid":
            message = f"malformed JSON body: {errors[0].get('ctx', {}).get('error', errors[0]['msg'])}"
            return JSONResponse(APIError(400, message).body(), status_code=400)
        fields = [".".join(str(p) for p in e["loc"] if p != "body") or "body" for e in errors]
        message = "; ".join(f"{field}: {_explain(e)}" for field, e in zip(fields, errors))
        # the request's own field, as OpenAI reports it
        return JSONResponse(APIError(400, message, fields[0].split(".")[0]).body(), status_code=400)

    if getattr(config, "api_key", None):
        app.add_middleware(_Authenticate, expected=f"Bearer {config.api_key}".encode())
    app.add_middleware(_CountRequests, metrics=metrics)  # added last, so it runs first: 401s are counted too

    async def submit(request: Request):
        try:
            await submitted(engine, request)
        except Overloaded:
            raise APIError(503, "the server is at capacity: retry shortly", kind="overloaded",
                           headers={"Retry-After": "1"}) from None
        except RankFailure as err:
            raise APIError(503, str(err), kind="server_error") from None
        except RequestTooLarge as err:  # the continuous scheduler: more than a rank's whole KV cache
            raise APIError(413, str(err), "max_tokens") from None

    async def submit_all(requests: list[Request]):
        for i, request in enumerate(requests):
            try:
                await submit(request)
            except APIError:
                for sent in requests[:i]:
                    sent.cancelled = True
                raise

    async def result(future):
        try:
            return await future
        except RankFailure as err:
            raise APIError(503, str(err), kind="server_error") from None
        except APIError:  # the scheduler refused it (an adapter unloaded meanwhile, a mixture over the budget)
            raise
        except Exception as err:  # the step that ran this request failed; the server goes on
            raise APIError(500, _failure(err), kind="server_error") from None

    def check_input(ids: list[int], param: str) -> list[int]:
        if len(ids) > config.max_input_tokens:
            raise APIError(413, f"{param} has {len(ids)} tokens, over this server's limit of "
                                f"{config.max_input_tokens}", param)
        return ids

    def check_model(name: str | None, adapter: str | None) -> str | None:
        """The adapter a request asks for: by `adapter`, or by naming an adapter as its `model` (as /v1/models
        lists them)."""
        if name is None or name == model_name:
            return adapter
        if name in app.state.adapter_names():
            if adapter is not None and adapter != name:
                raise APIError(400, f"adapter: {adapter!r} contradicts model {name!r}, an adapter", "adapter")
            return name
        raise APIError(404, f"model {name!r} is not served here; this server serves {model_name!r}", "model",
                       kind="not_found_error")

    @app.get("/health")
    async def health():
        if not engine.healthy:
            return JSONResponse({"status": "unhealthy", "reason": engine.failure}, status_code=503)
        return {"status": "ok", "model": model_name, "kind": model_kind, "ranks": engine.world,
                "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        body = metrics.render() + (await metrics.remote() if metrics.remote is not None else b"")
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(name: str, parent: str | None = None) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "tessera", "root": name,
                "parent": parent, "max_model_len": context_length}

    def model_cards() -> list[dict]:
        return [model_card(model_name)] + [model_card(a, model_name) for a in sorted(app.state.adapter_names())]

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": model_cards()}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        for card in model_cards():
            if card["id"] == name:
                return card
        raise APIError(404, f"model {name!r} is not served here", "model", kind="not_found_error")

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        check_model(body.model, None)
        if model_kind != "encoder":
            raise APIError(400, f"{model_name} is a {model_kind} model: it serves /v1/completions", "model")
        texts = [body.input] if isinstance(body.input, str) else body.input
        loop = asyncio.get_running_loop()
        requests = [Request("embed", check_input(tokenizer.encode(t), f"input[{i}]"), loop,
                            future=loop.create_future()) for i, t in enumerate(texts)]
        await submit_all(requests)
        vectors = [await result(r.future) for r in requests]
        tokens = sum(len(r.token_ids) for r in requests)
        return {"object": "list", "model": model_name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def check_generation(body):
        if model_kind == "encoder":
            raise APIError(400, f"{model_name} is an encoder model: it serves /v1/embeddings", "model")
        body.check()
        adapter = check_model(body.model, body.adapter)
        if adapter == "auto" and engine.router is None:
            raise APIError(400, "adapter: 'auto' needs a server started with a task router (--adapters DIR)",
                           "adapter")
        if adapter not in (None, "auto") and adapter not in app.state.adapter_names():
            raise APIError(400, f"adapter: {adapter!r} is not in this server's pool "
                                f"{sorted(app.state.adapter_names()) or '(none configured)'}", "adapter")
        return adapter

    def max_tokens(body, prompt_len: int, default: int, prompt_param: str) -> int:
        """The completion's token budget: as asked (checked against the server's limit and the context), or the
        default clipped to what the context leaves."""
        asked = body.asked_max_tokens()
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        if asked is not None and asked > config.max_new_tokens:
            raise APIError(400, f"{param}: at most {config.max_new_tokens} on this server", param)
        if context_length is None:
            return asked or default
        if prompt_len >= context_length:
            raise APIError(413, f"{prompt_param} has {prompt_len} tokens: this model's context is {context_length} "
                                "tokens, prompt and completion together", prompt_param)
        room = context_length - prompt_len
        if asked is not None and asked > room:
            raise APIError(400, f"{param}: {asked} tokens do not fit: this model's context is {context_length} "
                                f"tokens and the prompt has {prompt_len}, which leaves {room}", param)
        return asked or min(default, room)

    async def generate(http: HTTPRequest, body, shape, ids: list[int], text: str, adapter: str | None, limit: int):
        """Runs `n` choices of one prompt and answers them in `shape`, whole or as server-sent events."""
        loop = asyncio.get_running_loop()
        n, stream, stops = body.n or 1, bool(body.stream), body.stops()
        temperature = 1.0 if body.temperature is None else body.temperature
        params = dict(max_tokens=limit, temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
                      presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                      logprobs=body.top_logprobs_wanted())
        # Choice i of a seeded request samples with seed + i, so choices differ and each is reproducible.
        seeds = [None if body.seed is None else body.seed + i for i in range(n)]
        events = asyncio.Queue() if stream else None
        requests = [Request("generate", ids, loop, params={**params, "seed": seed}, text=text, adapter=adapter,
                            stop=stops, stream=stream, tokens=_Tagged(events, i) if stream else None,
                            future=None if stream else loop.create_future()) for i, seed in enumerate(seeds)]
        await submit_all(requests)
        created, ident = int(time.time()), f"{shape.id_prefix}-{uuid.uuid4().hex[:24]}"
        header = {"id": ident, "object": shape.object, "created": created, "model": body.model or model_name}

        def logprobs_of(stream: TextStream, entries: list, start: int, stop: int):
            if params["logprobs"] is None:
                return None
            rows = [(stream.tokens[j], *entries[j]) for j in range(start, min(stop, len(entries)))]
            return shape.logprobs(rows, stream.offsets[start:stop])

        if not stream:
            if not await _finished_before_disconnect(http, requests):
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
            choices, completion_tokens = [], 0
            for i, request in enumerate(requests):
                generation = await result(request.future)
                text_stream = TextStream(tokenizer.decode, stops, tokenizer.decode_stream())
                for token in generation.tokens:
                    text_stream.add(token)
                    if text_stream.stopped:
                        break
                text_stream.finish()
                finish = "stop" if text_stream.stopped or len(generation.tokens) < limit else "length"
                logprobs = logprobs_of(text_stream, generation.logprobs or [], 0, text_stream.text_tokens())
                choices.append(shape.choice(i, text_stream.text, finish, logprobs))
                completion_tokens += len(text_stream.tokens)  # through the stop string, if one ended it
            return {**header, "choices": choices, "usage": usage(len(ids), completion_tokens)}

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunk = {**header, "object": shape.chunk_object, **({"usage": None} if include_usage else {})}

        async def chunks():
            """Server-sent events of every choice. Whatever has arrived when the stream wakes goes out in one write,
            and each choice's text since its last event in one event: where the event loop falls behind, the
            tokens of several steps cost one event and one write, not one each."""
            texts = [TextStream(tokenizer.decode, stops, tokenizer.decode_stream()) for _ in range(n)]
            entries, reported, pending = [[] for _ in range(n)], [0] * n, [""] * n
            ready = [0] * n  # per choice: the tokens whose text is in `pending` (a held-back one is not)
            done = [False] * n
            completion_tokens = 0

            # the event of a running choice's text (no log-probabilities): most of the events streamed
            text_events = [TextEvent(lambda text, i=i: {**chunk, "choices": [shape.delta(i, text, None, None)]})
                           for i in range(n)] if params["logprobs"] is None else None

            def delta_event(i: int, text: str, finish: str | None, upto: int) -> str:
                if text_events is not None and finish is None:
                    return text_events[i](text)
                logprobs = logprobs_of(texts[i], entries[i], reported[i], upto)
                reported[i] = upto
                return sse({**chunk, "choices": [shape.delta(i, text, finish, logprobs)]})

            def pending_events() -> list[str]:  # the text of the choices still running, since their last event
                return [delta_event(i, pending[i], None, ready[i]) for i in range(n) if pending[i] and not done[i]]

            try:
                if isinstance(shape, ChatShape):
                    yield sse({**chunk, "choices": [shape.delta(i, "", None, None, first=True) for i in range(n)]})
                while not all(done):
                    arrived, events_out = [await events.get()], []
                    while not events.empty():
                        arrived.append(events.get_nowait())
                    for i, item in arrived:
                        if done[i]:
                            continue
                        if isinstance(item, Exception):
                            yield "".join(events_out + pending_events()) + sse(
                                item.body() if isinstance(item, APIError) else
                                {"error": {"message": _failure(item), "type": "server_error", "code": 500}})
                            return
                        finish, delta = None, ""
                        if item is None:  # the backend ended the row (its limit, or the end-of-sequence token)
                            finish = "stop" if len(texts[i].tokens) < limit else "length"
                        elif tokenizer.eos_token_id is not None and item[0] == tokenizer.eos_token_id:
                            finish = "stop"
                        else:
                            delta = texts[i].add(item[0])
                            entries[i].append(item[1])
                            if texts[i].stopped:
                                finish = "stop"
                            elif len(texts[i].tokens) >= limit:
                                finish = "length"
                        if delta:
                            pending[i], ready[i] = pending[i] + delta, len(texts[i].tokens)
                        if finish is None:
                            continue
                        done[i] = True
                        requests[i].cancelled = True  # done: stop its row if generation goes on for others
                        text = pending[i] + texts[i].finish()
                        completion_tokens += len(texts[i].tokens)
                        events_out.append(delta_event(i, text, finish, max(texts[i].text_tokens(), reported[i])))
                    events_out += pending_events()
                    pending = [""] * n
                    if events_out:
                        yield "".join(events_out)
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage(len(ids), completion_tokens)})
                yield sse("[DONE]")
            finally:
                for request in requests:
                    request.cancelled = True  # a client that went away frees its rows at the next step

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        adapter = check_generation(body)
        ids = check_input(tokenizer.encode(body.prompt), "prompt")
        limit = max_tokens(body, len(ids), min(16, config.max_new_tokens), "prompt")  # 16: OpenAI's default
        return await generate(http, body, CompletionShape(_token_text(tokenizer)), ids, body.prompt, adapter, limit)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        adapter = check_generation(body)
        messages = [m.for_template() for m in body.messages]
        try:
            ids = tokenizer.apply_chat_template(messages)
        except NoChatTemplate as err:
            raise APIError(400, f"{model_name}: {err}", "messages") from None
        except Exception as err:  # the template rejected the conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template failed: {type(err).__name__}: {err}",
                           "messages") from None
        check_input(ids, "messages")
        limit = max_tokens(body, len(ids), config.max_new_tokens, "messages")
        # the last user turn, for an "auto" adapter's task router
        text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        return await generate(http, body, ChatShape(_token_text(tokenizer)), ids, text, adapter, limit)

    return app


class _Authenticate:
    """Every /v1 endpoint needs the key; /health and /metrics stay open for probes and scrapers.

    Both middlewares are plain ASGI: starlette's BaseHTTPMiddleware (`@app.middleware`) relays every streamed
    chunk through a task and a queue, which took more of rank 0's event loop than the tokens' own work."""

    def __init__(self, app, expected: bytes):
        self.app, self.expected = app, expected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: the key does not leak by timing
                err = APIError(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                               kind="authentication_error")
                response = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class _CountRequests:
    """Requests by route and status, and the latency of whole (not streamed) /v1 answers."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, endpoint, streamed = time.perf_counter(), "unmatched", False

        async def counted(message):
            nonlocal endpoint, streamed
            if message["type"] == "http.response.start":
                # the route's template, not the raw path: a label per junk URL would grow the metrics without bound
                route = scope.get("route")
                endpoint = route.path if route is not None else "unmatched"
                streamed = any(name == b"content-type" and value.startswith(b"text/event-stream")
                               for name, value in message.get("headers", []))
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            elif message["type"] == "http.response.body" and not message.get("more_body", False) \
                    and not streamed and endpoint.startswith("/v1/"):
                self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, counted)


async def _finished_before_disconnect(http: HTTPRequest, requests: list[Request]) -> bool:
    """Waits for every choice's result. A client that disconnects first cancels its requests, as a stream's does,
    so they leave their batch at the next step instead of generating for nobody."""
    results = asyncio.gather(*(r.future for r in requests))
    results.add_done_callback(lambda f: f.cancelled() or f.exception())  # each choice's error is read on its own

    async def disconnected():  # the body is read, so what the client sends next can only be its disconnect
        while (await http.receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if results.done():
        return True
    for request in requests:
        request.cancelled = True
    return False


class _Tagged:
    """Where one choice's backend puts its stream items: the response's one queue, tagged with the choice."""

    def __init__(self, queue: asyncio.Queue, index: int):
        self.queue, self.index = queue, index

    def put_nowait(self, item) -> None:
        self.queue.put_nowait((self.index, item))


def _failure(err: Exception) -> str:
    if isinstance(err, StepFailure):  # it says where and what
        return str(err)
    return f"generation failed: {type(err).__name__}: {err}"


def _token_text(tokenizer):
    return lambda token_id: tokenizer.decode([token_id])


def _explain(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return f"{error['msg']} (not a field this server honours)"
    return error["msg"]

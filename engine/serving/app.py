"""The HTTP API (FastAPI): OpenAI-style /v1/embeddings and /v1/completions, /health and /metrics.

Errors come back as JSON `{"error": {"message", "type", "param"}}`: 400 for malformed JSON or a bad field (the
field is named), 413 for an input over the limit, 503 with Retry-After when the queue is full or a rank failed.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from engine.serving.batcher import BatchEngine, Overloaded, Request
from engine.serving.coordinator import RankFailure
from engine.serving.scheduler import RequestTooLarge, StepFailure


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[str] = Field(min_length=1)
    model: str | None = None
    encoding_format: Literal["float"] = "float"
    user: str | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    model: str | None = None
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    adapter: str | None = None  # an adapter of the server's pool, or "auto" (the task router decides)
    user: str | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error(status, message, param=None, kind="invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: BatchEngine, config, tokenizer, model_name: str, model_kind: str, metrics,
               adapter_names: frozenset = frozenset()) -> FastAPI:
    app = FastAPI(title="tessera", version="0.1.0")

    @app.exception_handler(APIError)
    async def api_error(_request, err: APIError):
        return _error(err.status, err.message, err.param, err.kind, err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, err: RequestValidationError):
        errors = err.errors()
        if errors[0]["type"] == "json_invalid":
            return _error(400, f"malformed JSON body: {errors[0].get('ctx', {}).get('error', errors[0]['msg'])}")
        fields = [".".join(str(p) for p in e["loc"] if p != "body") or "body" for e in errors]
        message = "; ".join(f"{field}: {e['msg']}" for field, e in zip(fields, errors))
        return _error(400, message, fields[0].split(".")[0])  # the request's own field, as OpenAI reports it

    @app.middleware("http")
    async def count(request: HTTPRequest, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        if endpoint.startswith("/v1/") and not isinstance(response, StreamingResponse):
            metrics.request_latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    def submit(request: Request):
        try:
            engine.submit(request)
        except Overloaded:
            raise APIError(503, "the server is at capacity: retry shortly", kind="overloaded",
                           headers={"Retry-After": "1"}) from None
        except RankFailure as err:
            raise APIError(503, str(err), kind="server_error") from None
        except RequestTooLarge as err:
            raise APIError(413, str(err), "max_tokens") from None

    def encode(text: str, param: str) -> list[int]:
        ids = tokenizer.encode(text)
        if len(ids) > config.max_input_tokens:
            raise APIError(413, f"{param} has {len(ids)} tokens, over this server's limit of "
                                f"{config.max_input_tokens}", param)
        return ids

    def check_model(name: str | None):
        if name is not None and name != model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {model_name!r}", "model",
                           kind="not_found_error")

    @app.get("/health")
    async def health():
        if not engine.healthy:
            return JSONResponse({"status": "unhealthy", "reason": engine.failure}, status_code=503)
        return {"status": "ok", "model": model_name, "kind": model_kind, "ranks": engine.coordinator.world,
                "queue_depth": engine.queue.qsize()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        check_model(body.model)
        if model_kind != "encoder":
            raise APIError(400, f"{model_name} is a {model_kind} model: it serves /v1/completions", "model")
        texts = [body.input] if isinstance(body.input, str) else body.input
        loop = asyncio.get_running_loop()
        requests = [Request("embed", encode(t, f"input[{i}]"), loop, future=loop.create_future())
                    for i, t in enumerate(texts)]
        for request in requests:
            submit(request)
        try:
            vectors = await asyncio.gather(*(r.future for r in requests))
        except RankFailure as err:
            raise APIError(503, str(err), kind="server_error") from None
        tokens = sum(len(r.token_ids) for r in requests)
        return {"object": "list", "model": model_name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body.model)
        if model_kind == "encoder":
            raise APIError(400, f"{model_name} is an encoder model: it serves /v1/embeddings", "model")
        if body.max_tokens > config.max_new_tokens:
            raise APIError(400, f"max_tokens: at most {config.max_new_tokens} on this server", "max_tokens")
        if body.adapter == "auto" and engine.router is None:
            raise APIError(400, "adapter: 'auto' needs a server started with a task router (--adapters DIR)",
                           "adapter")
        if body.adapter not in (None, "auto") and body.adapter not in adapter_names:
            raise APIError(400, f"adapter: {body.adapter!r} is not in this server's pool "
                                f"{sorted(adapter_names) or '(none configured)'}", "adapter")
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        loop = asyncio.get_running_loop()
        params = dict(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                      seed=body.seed if body.seed is not None else 0)
        request = Request("generate", encode(body.prompt, "prompt"), loop, params=params, stream=body.stream,
                          text=body.prompt, adapter=body.adapter, stop=stops)
        if body.stream:
            request.tokens = asyncio.Queue()
        else:
            request.future = loop.create_future()
        submit(request)
        created, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex[:24]}"

        def choice(text, finish):
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        if not body.stream:
            try:
                tokens = await request.future
            except RankFailure as err:
                raise APIError(503, str(err), kind="server_error") from None
            except StepFailure as err:
                raise APIError(500, str(err), kind="server_error") from None
            text, stopped = _apply_stops(tokenizer.decode(tokens), stops)
            finish = "stop" if stopped or len(tokens) < body.max_tokens else "length"
            return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [choice(text, finish)],
                    "usage": {"prompt_tokens": len(request.token_ids), "completion_tokens": len(tokens),
                              "total_tokens": len(request.token_ids) + len(tokens)}}

        async def events():
            tokens, sent, finish = [], "", "length"
            try:
                while True:
                    item = await request.tokens.get()
                    if item is None:
                        break
                    if isinstance(item, Exception):
                        yield _sse({"error": {"message": str(item), "type": "server_error"}})
                        return
                    tokens.append(item)
                    if tokenizer.eos_token_id is not None and item == tokenizer.eos_token_id:
                        finish = "stop"
                        break
                    text, stopped = _apply_stops(tokenizer.decode(tokens), stops)
                    if len(text) > len(sent):
                        yield _sse({"id": ident, "object": "text_completion", "created": created,
                                    "model": model_name, "choices": [choice(text[len(sent):], None)]})
                        sent = text
                    if stopped:
                        finish = "stop"
                        break
                    if len(tokens) >= body.max_tokens:
                        break
                request.cancelled = True  # done: stop its row if generation goes on for others
                yield _sse({"id": ident, "object": "text_completion", "created": created, "model": model_name,
                            "choices": [choice("", finish)]})
                yield "data: [DONE]\n\n"
            finally:
                request.cancelled = True  # a client that went away frees its row at the next step

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _apply_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"

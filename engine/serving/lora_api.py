"""LoRA adapters of a live server: vLLM's load/unload endpoints, the adapter names /v1/models lists, and a
device budget (`lora_budget_bytes`) smaller than the pool.

`POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter {"lora_name"}` take
vLLM's names. A change to the pool is one item of the scheduler's queue: it runs on every rank between two steps
(the continuous scheduler) or two batches (the static one), so the pool never changes under a forward pass.
Refused changes leave the pool as it was: an adapter for another base model, a corrupt or pickled file, a rank of
0, NaN weights or a name already loaded (400, naming the adapter and the problem); an unknown name (404). "Tasks"
of the router that used an unloaded adapter give its share to the base model
(engine.lora.LoRAModel.unload_adapter).

Unloading an adapter that requests use:
- continuous scheduler: the unload waits until the running and waiting requests that use the adapter have
  finished; from the moment it is asked for, /v1/models no longer lists the adapter and new requests naming it
  are refused (400 at the door, 404 if one slipped into the queue behind the unload). Running requests are never
  disturbed. A load whose adapter needs larger slots (a higher rank, more modules), so that the budget holds fewer
  adapters than the running requests of one rank (or the router's k) use at once, is undone and refused (409).
- static batcher: it waits for the running batch; requests still waiting in the queue for it make it a 409.

Over the budget: the continuous scheduler places a request on a rank only when the distinct adapters of that
rank's requests, its own included, fit the device cache; others wait (as vLLM's max_loras makes them), first
come first served. The static batcher splits a batch into sub-batches that each fit. Either way only a single
request whose own mixture is larger than the cache, or that names an adapter unloaded while it waited, gets an
error.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

POOL_OPS = ("lora_load", "lora_unload")


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM clients may send it; names identify adapters here


def lora_model(model):
    """The model's LoRAModel, or None when the server runs without LoRA."""
    return model if hasattr(model, "load_adapter") and hasattr(model, "pool") else None


class AdapterNames:
    """The live adapter names of the server's pool: what completions check `adapter` against, and what
    /v1/models lists (`names`, set as the app's `state.adapter_names`). `pool_names` reads the pool (rank 0's
    model, or what rank 0 last told an API server in a process of its own); None: the server runs without LoRA."""

    def __init__(self, pool_names=None):
        self.pool_names = pool_names
        self.draining: set[str] = set()  # unloads asked for and not yet done: no new request may name these

    @classmethod
    def of(cls, model) -> "AdapterNames":
        lm = lora_model(model)
        return cls(None if lm is None else lambda: lm.pool.names)

    @property
    def enabled(self) -> bool:
        return self.pool_names is not None

    def names(self) -> list[str]:
        return [] if self.pool_names is None else [n for n in self.pool_names() if n not in self.draining]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


# ---- on every rank ---------------------------------------------------------------------------------------
def apply_pool_op(model, op: dict) -> dict:
    """Runner side: load or unload on this rank's model. Returns {} or {"error", "status"}."""
    from engine.lora.errors import AdapterError, CacheFullError

    lm = lora_model(model)
    if lm is None:
        return {"error": "this server runs without LoRA adapters (start it with --enable-lora)", "status": 400}
    try:
        if op["type"] == "lora_load":
            lm.load_adapter(op["name"], op["path"])
        elif op["name"] not in lm.pool:
            return {"error": f"adapter {op['name']!r} is not loaded", "status": 404}
        else:
            lm.unload_adapter(op["name"])
    except (AdapterError, CacheFullError) as err:
        return {"error": str(err), "status": 400}
    return {}


# ---- on rank 0's batcher thread --------------------------------------------------------------------------
def waiting_for(engine, name: str) -> int:
    """Requests in the batcher's queue or held back that name adapter `name`."""
    with engine.queue.mutex:
        queued = list(engine.queue.queue)
    return sum(1 for r in queued + list(engine.held) if getattr(r, "kind", None) == "generate"
               and r.adapter == name)


def run_pool_op(engine, op: dict) -> dict:
    """The static batcher: apply `op` on every rank between batches; refuse an unload that queued requests need."""
    if op["type"] == "lora_unload":
        waiting = waiting_for(engine, op["name"])
        if waiting:
            return {"error": f"adapter {op['name']!r} is in use by {waiting} waiting request(s); unload it once "
                             "they finish", "status": 409}
    return apply_everywhere(engine.coordinator, op)


def apply_everywhere(coordinator, op: dict) -> dict:
    """Apply `op` on every rank; a load that one rank refused is undone on the others."""
    results = coordinator.execute(op)
    errors = [r for r in results if r.get("error")]
    if errors and op["type"] == "lora_load" and len(errors) < len(results):
        coordinator.execute({"type": "lora_unload", "name": op["name"]})
    return errors[0] if errors else {}


def load_between_steps(coordinator, model, op: dict, running: int, router_k: int = 0) -> dict:
    """The continuous scheduler: load on every rank, and undo the load when the slots its adapter needs leave
    the device cache fewer than the `running` adapters one rank's requests use now (409: retry later) or than
    the router's `router_k` (400). Between steps nothing is pinned, so the cache may re-lay its slots freely."""
    result = apply_everywhere(coordinator, op)
    lm = lora_model(model)
    capacity, router_k = lm.cache.capacity, min(router_k, len(lm.pool))
    if result or capacity >= max(running, router_k):
        return result
    apply_everywhere(coordinator, {"type": "lora_unload", "name": op["name"]})
    status, need = (400, f"the router mixes up to k={router_k}") if router_k > capacity else \
        (409, f"running requests use {running} at once on one rank; retry when they finish")
    return {"error": f"adapter {op['name']!r}: with its larger slots the device budget for adapters "
                     f"(lora_budget_bytes) holds {capacity} adapter(s), but {need}", "status": status}


def unknown_or_too_large(mixture: dict, model) -> Exception | None:
    """Why a request's mixture cannot run at all (an adapter gone from the pool, more adapters than the device
    cache holds at once), or None."""
    lm = lora_model(model)
    capacity = lm.cache.capacity if lm is not None else 0
    gone = [n for n in mixture if lm is None or n not in lm.pool]
    if gone:
        return request_error(404, f"adapter {gone[0]!r} was unloaded while the request waited", "adapter")
    if len(mixture) > capacity:
        return request_error(400, f"the request mixes {len(mixture)} adapters {sorted(mixture)} but the device "
                                  f"budget holds {capacity} at once (raise lora_budget_bytes)", "adapter")
    return None


def request_error(status: int, message: str, param: str | None = None):
    from engine.serving.openai_protocol import APIError

    kind = {404: "not_found_error", 409: "conflict_error"}.get(status, "invalid_request_error")
    return APIError(status, message, param, kind=kind)


def sub_batches(batch: list, mixtures: list[dict], model):
    """Split rows so each part's distinct adapters fit the device cache. Returns (parts, rejected): parts are
    lists of (request, mixture) in batch order, first fit; rejected are (request, error) for rows that name an
    adapter no longer loaded or need more adapters at once than the cache holds."""
    lm = lora_model(model)
    capacity = lm.cache.capacity if lm is not None else 0
    parts: list[tuple[list, set]] = []
    rejected = []
    for request, mix in zip(batch, mixtures):
        error = unknown_or_too_large(mix, model)
        if error is not None:
            rejected.append((request, error))
            continue
        for rows, names in parts:
            if len(names | set(mix)) <= capacity:
                rows.append((request, mix))
                names.update(mix)
                break
        else:
            parts.append(([(request, mix)], set(mix)))
    return [rows for rows, _ in parts], rejected


# ---- HTTP --------------------------------------------------------------------------------------------------
def mount(app, engine, names: AdapterNames, model_name: str) -> None:
    """Add the load/unload endpoints to the server's FastAPI app."""
    from fastapi.responses import PlainTextResponse

    from engine.serving.batcher import Overloaded, Request, submitted
    from engine.serving.coordinator import RankFailure
    from engine.serving.openai_protocol import APIError

    app.state.adapter_names = names.names  # what completions accept and /v1/models lists, read live
    async def change(op: dict) -> None:
        if not names.enabled:
            raise APIError(400, "this server does not change its adapters at run time: start it with "
                                "--enable-lora", "lora_name")
        loop = asyncio.get_running_loop()
        request = Request("lora", [], loop, params=op, future=loop.create_future())
        try:
            await submitted(engine, request)
            result = await request.future  # set on the batcher thread, between two batches
        except Overloaded:
            raise APIError(503, "the server is at capacity: retry shortly", kind="overloaded",
                           headers={"Retry-After": "1"}) from None
        except RankFailure as err:  # on submit, or while the change ran
            raise APIError(503, str(err), kind="server_error") from None
        if result.get("error"):
            param = "lora_path" if op["type"] == "lora_load" and result["status"] == 400 else "lora_name"
            raise request_error(result["status"], result["error"], param)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRARequest):
        name = body.lora_name
        if name in ("auto", model_name):
            raise APIError(400, f"lora_name: {name!r} is reserved (it means the router or the base model)",
                           "lora_name")
        if name in names.draining:
            raise APIError(409, f"adapter {name!r} is being unloaded; load it again once that is done", "lora_name",
                           kind="conflict_error")
        if name in names:
            raise APIError(400, f"adapter {name!r} is already loaded; unload it first to replace it", "lora_name")
        if not Path(body.lora_path).is_dir():
            raise APIError(400, f"adapter {name!r}: lora_path {body.lora_path!r} is not a directory on the server",
                           "lora_path")
        await change({"type": "lora_load", "name": name, "path": body.lora_path})
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRARequest):
        if body.lora_name in names.draining:
            raise APIError(409, f"adapter {body.lora_name!r} is already being unloaded", "lora_name",
                           kind="conflict_error")
        if body.lora_name not in names:
            raise APIError(404, f"adapter {body.lora_name!r} is not loaded (loaded: {sorted(names) or 'none'})",
                           "lora_name", kind="not_found_error")
        names.draining.add(body.lora_name)  # from now on no new request names it, and /v1/models omits it
        try:
            await change({"type": "lora_unload", "name": body.lora_name})
        finally:
            names.draining.discard(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

"""The continuous scheduler serving a LoRA pool: a device budget smaller than the pool (requests wait for adapter
room, first come first served, and never fail) and adapters loaded and unloaded between steps, in one process
and on a real 2-rank server. Every request's tokens are those of the same request run alone."""
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import engine
from engine.lora import AdapterPool
from engine.lora.cache import AdapterCache
from engine.serving.batcher import Request
from engine.serving.coordinator import Coordinator
from engine.serving.paged_batch import RankBatch
from engine.serving.runner import Runner
from engine.serving.scheduler import ContinuousEngine
from engine.serving.tokenizer import ByteTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))
from lora_helpers import save_adapter  # noqa: E402

TARGETS = ("q_proj", "v_proj")
EOS = 2  # tiny-mixtral's


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Four adapters of tiny-mixtral, one of rank 8 (twice the slot), the bytes of one rank-4 slot, and the
    model with every adapter resident (the reference)."""
    root = tmp_path_factory.mktemp("pool")
    base = engine.load("tiny-mixtral", device="cpu")
    folders = {n: save_adapter(base, root / n, seed=21 + i, targets=TARGETS) for i, n in enumerate("abcd")}
    folders["r8"] = save_adapter(base, root / "r8", seed=30, r=8, targets=TARGETS)
    one = AdapterCache.adapter_bytes(AdapterPool({"a": folders["a"]}), torch.float32)
    full = engine.load("tiny-mixtral", device="cpu", adapters=folders, adapter_options={"backend": "torch"})
    return folders, one, full


def alone(full, prompt: list[int], adapter: str | None, max_tokens: int) -> list[int]:
    out = full.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                        adapter_weights=[{adapter: 1.0} if adapter else {}])
    tokens = out[0, len(prompt):].tolist()
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


def test_generate_batch_runs_each_prompt_with_its_named_adapter(pool):
    _, _, full = pool
    prompts = [[5, 9, 14, 3, 7], [11, 4, 8], [6, 6, 12, 30, 2, 9, 17], [20, 21]]
    names = ["a", None, "r8", "a"]
    got = engine.generate_batch(full, prompts, max_new_tokens=12, adapters=names)
    assert got == [alone(full, p, name, 12) for p, name in zip(prompts, names)]
    assert len({tuple(t) for t in got[:3]}) == 3  # the adapters change what is generated
    with pytest.raises(ValueError, match=r"\['nope'\] are not in the model's LoRA pool"):
        engine.generate_batch(full, prompts[:1], adapters=["nope"])
    with pytest.raises(ValueError, match="1 entries for 2 prompts"):
        engine.generate_batch(full, prompts[:2], adapters=["a"])


def budgeted(folders, names, one: int, slots: int):
    """tiny-mixtral with adapters `names` and a device budget of `slots` rank-4 adapters."""
    lm = engine.load("tiny-mixtral", device="cpu", adapters={n: folders[n] for n in names},
                     adapter_options={"cache_bytes": slots * one + one // 2, "backend": "torch"})
    assert lm.cache.capacity == slots
    return lm


def record_acquires(lm) -> list[int]:
    """Distinct adapters of every forward pass (what the cache had to hold at once)."""
    sizes, acquire = [], lm.cache.acquire

    def counted(names):
        names = list(names)
        sizes.append(len(set(names)))
        return acquire(names)

    lm.cache.acquire = counted
    return sizes


def generate(adapter, prompt, max_tokens):
    return Request("generate", list(prompt), None, params={"max_tokens": max_tokens, "temperature": 0.0,
                                                           "top_p": 1.0, "seed": None}, adapter=adapter)


def pool_op(kind, name, path=None):
    return Request("lora", [], None, params={"type": kind, "name": name, **({"path": str(path)} if path else {})})


def tick(scheduler: ContinuousEngine) -> None:
    """One turn of the scheduler thread's loop: take what came, change the pool if it may, step."""
    scheduler._drain()
    scheduler._apply_pool_ops()
    if scheduler.active or scheduler.incoming:
        scheduler.step()


def scheduler_for(lm) -> ContinuousEngine:
    runner = Runner(lm, ByteTokenizer(lm.config.vocab_size))
    runner.batch = RankBatch(lm, num_blocks=32, block_size=16)
    scheduler = ContinuousEngine(Coordinator(runner, world=1))
    scheduler.step()
    return scheduler


# ---- in one process --------------------------------------------------------------------------------------
def test_a_budget_of_two_serves_four_adapters_and_each_request_gets_its_tokens_alone(pool):
    folders, one, full = pool
    lm = budgeted(folders, "abcd", one, slots=2)
    sizes = record_acquires(lm)
    scheduler = scheduler_for(lm)
    adapters = ["a", "b", "c", "d", None]
    requests = [generate(a, range(10 + 3 * i, 24 + 4 * i), 6) for i, a in enumerate(adapters)]
    for request in requests:
        scheduler.submit(request)
    while any(r.result is None for r in requests):
        tick(scheduler)
    scheduler.coordinator.runner.batch.close()
    assert [r.result.tokens for r in requests] == [alone(full, r.token_ids, a, 6) for r, a in zip(requests, adapters)]
    assert max(sizes) == 2  # two adapters shared steps, never more than the budget holds
    assert lm.cache.evictions > 0  # the four took turns in the two slots


def test_waiting_for_adapter_room_is_first_come_first_served(pool):
    folders, one, full = pool
    lm = budgeted(folders, "ab", one, slots=1)
    scheduler = scheduler_for(lm)
    order = ["a", "b", "a", None]
    requests = [generate(a, [5 + i, 6, 7, 8], 4) for i, a in enumerate(order)]
    for request in requests:
        scheduler.submit(request)
    placed, finished, step = {}, {}, 0
    while any(r.result is None for r in requests):
        tick(scheduler)
        step += 1
        for i, request in enumerate(requests):
            if request.id in scheduler.active or request.result is not None:
                placed.setdefault(i, step)
            if request.result is not None:
                finished.setdefault(i, step)
    scheduler.coordinator.runner.batch.close()
    assert placed[0] == placed[3] == 1  # the base model's request does not wait for adapter room
    assert placed[1] == finished[0] + 1  # b joins at the step after the first a leaves the slot ...
    assert placed[2] == finished[1] + 1  # ... and the second a, whose adapter was there first, waits behind b
    assert [r.result.tokens for r in requests] == [alone(full, r.token_ids, a, 4) for r, a in zip(requests, order)]


def test_load_and_unload_between_steps_leave_running_requests_alone(pool):
    folders, one, full = pool
    lm = budgeted(folders, "ab", one, slots=2)
    scheduler = scheduler_for(lm)
    first, second = generate("a", list(range(30, 40)), 8), generate("b", list(range(50, 56)), 8)
    scheduler.submit(first)
    scheduler.submit(second)
    tick(scheduler)
    tick(scheduler)

    load = pool_op("lora_load", "c", folders["c"])  # loaded at the next step, the others running on
    scheduler.submit(load)
    tick(scheduler)
    assert load.result == {} and "c" in lm.pool
    # rank 8 needs twice the slot: the budget would hold one adapter while two run, so the load is undone
    wide = pool_op("lora_load", "r8", folders["r8"])
    scheduler.submit(wide)
    tick(scheduler)
    assert wide.result["status"] == 409 and "adapter 'r8'" in wide.result["error"]
    assert "holds 1 adapter(s), but running requests use 2" in wide.result["error"]
    assert lm.pool.names == ["a", "b", "c"] and lm.cache.capacity == 2

    unload = pool_op("lora_unload", "a")
    scheduler.submit(unload)
    late = generate("a", [9, 9, 9], 4)  # names the adapter after its unload was asked for
    scheduler.submit(late)
    third = generate("c", list(range(60, 66)), 4)
    scheduler.submit(third)
    tick(scheduler)
    assert unload.result is None and "a" in lm.pool  # it waits for the request that uses it
    assert late.result.status == 404 and "adapter 'a' is being unloaded" in str(late.result)
    while first.result is None or unload.result is None:
        tick(scheduler)
    assert unload.result == {} and "a" not in lm.pool
    while second.result is None or third.result is None:
        tick(scheduler)
    scheduler.coordinator.runner.batch.close()
    assert first.result.tokens == alone(full, first.token_ids, "a", 8)
    assert second.result.tokens == alone(full, second.token_ids, "b", 8)
    assert third.result.tokens == alone(full, third.token_ids, "c", 4)
    again = pool_op("lora_unload", "a")
    scheduler.submit(again)
    tick(scheduler)
    assert again.result["status"] == 404 and "adapter 'a' is not loaded" in again.result["error"]


def test_auto_mixtures_within_the_budget_and_a_load_the_router_would_not_fit(pool):
    """"auto" requests are routed once (k=2 of three adapters), wait for room like named ones, and a load that
    would leave fewer slots than the router's k is refused."""
    from engine import TaskRouter

    folders, one, full = pool
    tasks = {"a": ["Add 2 and 3.", "What is 7 times 8?"], "b": ["Hello there!", "Good morning to you."],
             "c": ["Translate cat into French.", "Say dog in German."]}
    router = TaskRouter.build(tasks, adapters={n: folders[n] for n in "abc"}, k=2)
    lm = budgeted(folders, "abc", one, slots=2)
    scheduler = scheduler_for(lm)
    scheduler.router = router
    sizes = record_acquires(lm)
    tokenizer = ByteTokenizer(lm.config.vocab_size)
    texts = ["Add 4 and 9.", "Hi, nice to meet you!", "Say bird in French."]
    requests = [generate("auto", tokenizer.encode(t), 4) for t in texts]
    for request, text in zip(requests, texts):
        request.text = text
        scheduler.submit(request)
    wide = pool_op("lora_load", "r8", folders["r8"])
    scheduler.submit(wide)
    while any(r.result is None for r in requests) or wide.result is None:
        tick(scheduler)
    scheduler.coordinator.runner.batch.close()
    mixtures = [dict(d.adapters) for d in router.route(texts)]
    assert len({frozenset(m) for m in mixtures}) > 1 and all(len(m) == 2 for m in mixtures)
    assert max(sizes) == 2
    for request, mixture in zip(requests, mixtures):
        out = full.generate(input_ids=torch.tensor([request.token_ids]), max_new_tokens=4, do_sample=False,
                            adapter_weights=[mixture])
        want = out[0, len(request.token_ids):].tolist()
        assert request.result.tokens == (want[: want.index(EOS)] if EOS in want else want)
    assert wide.result["status"] == 400 and "the router mixes up to k=2" in wide.result["error"]
    assert lm.pool.names == ["a", "b", "c"] and lm.cache.capacity == 2


# ---- a real 2-rank server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(server_factory, pool):
    _, one, _ = pool
    # the default (continuous) scheduler, room for one adapter per rank
    return server_factory("--model", "tiny-mixtral", "--strategy", "moeshard", "--enable-lora",
                          "--lora-budget-bytes", str(one + one // 2), "--max-batch-size", "8")


def expected_text(full, prompt: str, adapter: str | None, max_tokens: int) -> str:
    tokenizer = ByteTokenizer(full.config.vocab_size)
    return tokenizer.decode(alone(full, tokenizer.encode(prompt), adapter, max_tokens))


def completion(client, prompt, adapter, max_tokens=5):
    return client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                "adapter": adapter})


def gauges(client) -> dict:
    """Each gauge's value, summed over ranks."""
    values = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0) + sample.value
    return values


def model_ids(server):
    return [m["id"] for m in server.client.get("/v1/models").json()["data"]]


def test_a_live_pool_over_budget_on_two_ranks(server, pool):
    folders, _, full = pool
    for name in "abc":
        response = server.client.post("/v1/load_lora_adapter", json={"lora_name": name,
                                                                      "lora_path": str(folders[name])})
        assert response.status_code == 200, response.text
    assert {"a", "b", "c"} <= set(model_ids(server))
    duplicate = server.client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(folders["b"])})
    assert duplicate.status_code == 400 and "adapter 'a' is already loaded" in duplicate.text

    # five requests, four adapters' worth, one slot per rank: they take turns and all complete
    jobs = [("Add 2 and 3.", "a"), ("Add 2 and 3.", "b"), ("Hello there", "c"), ("Hello there", None),
            ("Hello there", "a")]
    results = [None] * len(jobs)

    def run(i, prompt, adapter):
        with httpx.Client(base_url=server.url, timeout=120) as client:
            results[i] = completion(client, prompt, adapter)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (prompt, adapter), response in zip(jobs, results):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected_text(full, prompt, adapter, 5)

    # a long stream on adapter a; meanwhile d is loaded and used, and a's unload waits for the stream
    prompt, long_tokens = "Tell a story.", 64  # no EOS before 64 tokens with adapter a
    want_long, want_d = expected_text(full, prompt, "a", long_tokens), expected_text(full, "Hello there", "d", 5)
    events, started, done = [], threading.Event(), threading.Event()

    def stream():
        with httpx.Client(base_url=server.url, timeout=120) as client, client.stream(
                "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": long_tokens, "temperature": 0,
                                                 "adapter": "a", "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
        done.set()

    streamer = threading.Thread(target=stream)
    streamer.start()
    assert started.wait(120)
    loaded = server.client.post("/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": str(folders["d"])})
    assert loaded.status_code == 200, loaded.text
    used = completion(server.client, "Hello there", "d")
    assert used.status_code == 200 and used.json()["choices"][0]["text"] == want_d

    unloaded = {}

    def unload():
        with httpx.Client(base_url=server.url, timeout=120) as client:
            unloaded["response"] = client.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
            unloaded["gauges"] = gauges(client)  # as the last step left them

    unloader = threading.Thread(target=unload)
    assert not done.is_set(), len(events)  # the stream still runs when the unload is asked for
    unloader.start()
    deadline = time.time() + 60
    while "a" in model_ids(server) and time.time() < deadline:  # asked for: no longer listed
        time.sleep(0.05)
    refused = completion(server.client, "Hello there", "a")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "adapter", refused.text
    unloader.join(timeout=120)
    streamer.join(timeout=120)
    assert unloaded["response"].status_code == 200, unloaded["response"].text
    # the unload answered only after the stream that used the adapter had left both ranks
    assert unloaded["gauges"]["tessera_running_requests"] == 0, unloaded["gauges"]
    assert unloaded["gauges"]["tessera_kv_blocks_used"] == 0, unloaded["gauges"]
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert events[-1] == "[DONE]" and text == want_long
    gone = server.client.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
    assert gone.status_code == 404 and "adapter 'a' is not loaded" in gone.text
    assert "a" not in model_ids(server) and {"b", "c", "d"} <= set(model_ids(server))
    assert completion(server.client, "Hello there", "a").status_code == 400

"""scripts/serve_moe.py as users meet it: a real server over loopback with 2 gloo ranks."""
import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import engine

TEXTS = ["A man is eating food.", "The new movie is awesome", "tessera shards every expert over all GPUs"]


@pytest.fixture(scope="module")
def minilm(server_factory):
    return server_factory("--strategy", "moeshard", "--max-queue", "4", "--max-batch-size", "2",
                          "--max-input-tokens", "64")


@pytest.fixture(scope="module")
def mixtral(server_factory):
    return server_factory("--model", "tiny-mixtral", "--strategy", "ep")


def test_embeddings_equal_sentence_transformers(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from engine.models.minilm_moe import minilm_path

    want = torch.tensor(sentence_transformers.SentenceTransformer(str(minilm_path()), device="cpu").encode(TEXTS))
    response = minilm.client.post("/v1/embeddings", json={"input": TEXTS, "model": "minilm-moe"})
    assert response.status_code == 200, response.text
    body = response.json()
    got = torch.tensor([item["embedding"] for item in sorted(body["data"], key=lambda d: d["index"])])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert body["usage"]["prompt_tokens"] > len(TEXTS)


def test_health_and_metrics(minilm):
    health = minilm.client.get("/health").json()
    assert health["status"] == "ok" and health["ranks"] == 2
    minilm.client.post("/v1/embeddings", json={"input": "warm the counters"})
    families = {f.name: f for f in text_string_to_metric_families(minilm.client.get("/metrics").text)}
    for name in ("tessera_request_latency_seconds", "tessera_queue_depth", "tessera_batch_size",
                 "tessera_tokens_in", "tessera_expert_tokens", "tessera_rank_compute_seconds",
                 "tessera_tokens_dropped", "tessera_time_to_first_token_seconds"):
        assert name in families, name
    latency = families["tessera_request_latency_seconds"].samples
    assert any(s.name.endswith("_count") and s.labels["endpoint"] == "/v1/embeddings" and s.value >= 1 for s in latency)
    ranks = {s.labels["rank"] for s in families["tessera_rank_compute_seconds"].samples}
    assert ranks == {"0", "1"}
    experts = {s.labels["expert"] for s in families["tessera_expert_tokens"].samples if s.value > 0}
    assert len(experts) > 1


@pytest.mark.parametrize("payload,status,param", [
    (b"{not json", 400, None),
    (json.dumps({"inputs": "typo in the field name"}).encode(), 400, "input"),
    (json.dumps({"input": 42}).encode(), 400, "input"),
    (json.dumps({"input": "x", "encoding_format": "base64"}).encode(), 400, "encoding_format"),
    (json.dumps({"input": "x", "model": "other"}).encode(), 404, "model"),
])
def test_bad_requests_name_the_problem(minilm, payload, status, param):
    response = minilm.client.post("/v1/embeddings", content=payload, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"]
    if param:
        assert error["param"] == param
    if b"inputs" in payload:
        assert "inputs: Extra inputs are not permitted" in error["message"]


def test_oversize_input_is_413(minilm):
    response = minilm.client.post("/v1/embeddings", json={"input": "word " * 200})
    assert response.status_code == 413
    assert "over this server's limit of 64" in response.json()["error"]["message"]


def test_wrong_endpoint_for_the_model(minilm):
    response = minilm.client.post("/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 400 and "encoder model" in response.json()["error"]["message"]


def test_overload_is_503_with_retry_after_not_a_timeout(minilm):
    async def flood():
        async with httpx.AsyncClient(base_url=minilm.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": [f"text {i} " * 20]})
                                          for i in range(60)))

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}
    assert 503 in statuses and 200 in statuses
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
    assert minilm.client.get("/health").json()["status"] == "ok"


def test_completions_match_single_process_generation(mixtral):
    from engine.serving.tokenizer import ByteTokenizer

    prompt = "hello tessera"
    response = mixtral.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    model = engine.load("tiny-mixtral", device="cpu")
    tokenizer = ByteTokenizer(model.config.vocab_size)
    ids = torch.tensor([tokenizer.encode(prompt)])
    want = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    assert choice["text"] == tokenizer.decode(want)
    assert choice["finish_reason"] == "length"

    with mixtral.client.stream("POST", "/v1/completions",
                               json={"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True}) as stream:
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["finish_reason"] == "length"


def test_completion_bad_fields(mixtral):
    response = mixtral.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    response = mixtral.client.post("/v1/completions", json={"prompt": "x", "temperature": 7})
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"


def test_client_disconnect_mid_stream_frees_its_slot(mixtral):
    with mixtral.client.stream("POST", "/v1/completions",
                               json={"prompt": "go", "max_tokens": 100, "temperature": 0, "stream": True}) as stream:
        next(stream.iter_lines())  # the first token arrived; now hang up
    response = mixtral.client.post("/v1/completions", json={"prompt": "next", "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_drains_in_flight_requests_then_exits_zero(server_factory, sig):
    """SIGTERM reaches rank 0 (the HTTP server); Ctrl-C in a terminal sends SIGINT to every rank."""
    server = server_factory("--model", "tiny-mixtral", "--strategy", "moeshard")
    with server.client.stream("POST", "/v1/completions",
                              json={"prompt": "drain", "max_tokens": 40, "temperature": 0, "stream": True}) as stream:
        lines = stream.iter_lines()
        next(lines)
        for rank in ([0] if sig == "SIGTERM" else sorted(server.workers, reverse=True)):
            os.kill(server.workers[rank], getattr(signal, sig))
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert server.wait(timeout=90) == 0, server.output()


def test_a_killed_worker_makes_the_server_exit_non_zero(server_factory):
    server = server_factory("--model", "tiny-mixtral", "--strategy", "moeshard")
    os.kill(server.workers[1], signal.SIGKILL)
    assert server.wait(timeout=120) != 0
    deadline = time.time() + 30  # rank 0's API process follows it
    while time.time() < deadline and not exited(server.api):
        time.sleep(0.2)
    assert exited(server.api)


def exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def test_static_batcher_ends_a_row_at_the_models_end_of_sequence_without_padding():
    """A byte-tokenizer model has no tokenizer EOS: the model's own (its generation config) ends the row, in the
    whole answer and in the stream, and neither it nor generate's padding after it becomes text."""
    import copy

    from engine.serving.app import create_app
    from engine.serving.batcher import BatchEngine
    from engine.serving.config import ServeConfig
    from engine.serving.coordinator import Coordinator
    from engine.serving.metrics import Metrics
    from engine.serving.runner import Runner
    from engine.serving.tokenizer import ByteTokenizer

    model = copy.deepcopy(engine.load("tiny-mixtral", device="cpu"))
    tokenizer = ByteTokenizer(model.config.vocab_size)
    short, long = tokenizer.encode("ends early"), tokenizer.encode("runs on and on")
    free = model.generate(input_ids=torch.tensor([short]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    free = free[0, len(short):].tolist()
    model.generation_config.eos_token_id = free[2]  # this model's greedy continuation ends at its third token
    want = free[: free.index(free[2])]
    assert tokenizer.eos_token_id is None and free[2] not in long[-1:]

    config = ServeConfig(model="tiny-mixtral", scheduler="static", max_wait_ms=200)
    metrics = Metrics()
    batcher = BatchEngine(Coordinator(Runner(model, tokenizer), world=1), config, metrics)
    batcher.start()
    app = create_app(batcher, config, tokenizer, "tiny-mixtral", "decoder", metrics)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://tessera") as client:
            body = {"max_tokens": 8, "temperature": 0}
            whole = client.post("/v1/completions", json={**body, "prompt": "ends early"})
            other = client.post("/v1/completions", json={**body, "prompt": "runs on and on"})
            whole, other = await asyncio.gather(whole, other)  # one batch: the other row runs on
            streamed = client.post("/v1/completions", json={**body, "prompt": "ends early", "stream": True})
            other_streamed = client.post("/v1/completions", json={**body, "prompt": "runs on and on", "stream": True})
            return whole, other, *await asyncio.gather(streamed, other_streamed)

    try:
        whole, other, streamed, _ = asyncio.run(scenario())
    finally:
        batcher.stop(timeout=30)
    choice = whole.json()["choices"][0]
    assert choice["text"] == tokenizer.decode(want) and "\x02" not in choice["text"] and len(want) == 2
    assert choice["finish_reason"] == "stop"
    assert whole.json()["usage"]["completion_tokens"] == len(want)
    assert other.json()["choices"][0]["finish_reason"] == "length"
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["finish_reason"] == "stop" and events[-1] == "[DONE]"


def test_static_batcher_survives_a_client_whose_event_loop_has_closed():
    """Delivering to a loop that is gone (its client left for good) marks the request cancelled instead of
    raising "Event loop is closed" in the batcher thread, which would stop it serving everyone else."""
    from engine.serving.batcher import BatchEngine, Request

    loop = asyncio.new_event_loop()
    streamed = Request("generate", [1, 2], loop, stream=True, tokens=asyncio.Queue())
    answered = Request("generate", [1, 2], loop, future=loop.create_future())
    loop.close()
    for request in (streamed, answered):
        BatchEngine._finish(None, request, RuntimeError("late"))
        assert request.cancelled

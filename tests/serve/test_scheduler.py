"""The continuous scheduler on one process: the tokens of model.generate, chunked prefill, preemption when the KV
cache is full, per-request seeds, and a failing step that fails only its own requests."""
import asyncio
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import engine
from engine.serving.coordinator import Coordinator
from engine.serving.paged_batch import RankBatch
from engine.serving.runner import Runner
from engine.serving.scheduler import ContinuousEngine
from engine.serving.tokenizer import ByteTokenizer

PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 80)), [3, 4], list(range(20, 60)), list(range(40, 47))]


@pytest.fixture(scope="module")
def model():
    return engine.load("tiny-mixtral", device="cpu")


def reference(model, prompt, max_new_tokens):
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    tokens = out[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_chunked_prefill_and_preemption_give_the_tokens_of_generate(model):
    # 6 blocks of 16 tokens for 5 requests of up to 82 tokens: they cannot all run at once, and the newest is
    # preempted and recomputed; 32 tokens per step splits the 70- and 40-token prompts over several steps.
    batch = RankBatch(model, num_blocks=6, block_size=16, step_tokens=32)
    for i, prompt in enumerate(PROMPTS):
        batch.add(f"r{i}", prompt, max_tokens=12)
    tokens = {}
    while not batch.idle():
        for event in batch.step():
            tokens.setdefault(event["id"], []).extend(event["tokens"])
    batch.close()
    assert batch.stats()["preemptions"] > 0
    assert batch.stats()["blocks_free"] == batch.stats()["blocks_total"] == 6
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == [reference(model, p, 12) for p in PROMPTS]


def test_generate_batch_greedy_is_generate(model):
    prompts = [PROMPTS[0], PROMPTS[4]]
    assert engine.generate_batch(model, prompts, max_new_tokens=6) == [reference(model, p, 6) for p in prompts]


def test_a_seed_gives_the_same_tokens_whatever_the_batch(model):
    alone = engine.generate_batch(model, [[1, 2, 3]], max_new_tokens=8, temperature=0.9, top_p=0.9, seed=11)[0]
    together = engine.generate_batch(model, [[1, 2, 3], *PROMPTS], max_new_tokens=8, temperature=0.9, top_p=0.9,
                                     seed=11)
    assert together[0] == alone
    other = engine.generate_batch(model, [[1, 2, 3]], max_new_tokens=8, temperature=0.9, seed=12)[0]
    assert other != alone  # the seed matters (8 tokens of a 128-token vocabulary)


def run_alone(batch, request_id):
    tokens, entries = [], []
    while not batch.idle():
        for event in batch.step():
            tokens += event["tokens"]
            entries += event["logprobs"] or []
    return tokens, entries


def test_logprobs_are_the_models_and_a_frequency_penalty_stops_repeats(model):
    prompt = list(range(10, 30))
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=None)
    want = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
    batch = RankBatch(model, num_blocks=16, block_size=16, eos_token_id=-1)
    batch.add("a", prompt, max_tokens=10, logprobs=3)
    tokens, entries = run_alone(batch, "a")
    assert tokens == out.sequences[0, len(prompt):].tolist()
    for token, (logprob, alternatives), logprobs in zip(tokens, entries, want):
        assert logprob == pytest.approx(logprobs[token].item(), abs=1e-4)
        assert [i for i, _ in alternatives] == logprobs.topk(3).indices.tolist()
    assert len(tokens) > len(set(tokens))  # greedy repeats itself on this prompt ...
    batch.add("b", prompt, max_tokens=10, frequency_penalty=100.0)
    penalised, _ = run_alone(batch, "b")
    batch.close()
    assert len(penalised) == len(set(penalised)) == 10  # ... and not with a large frequency penalty


class FailOnce:
    """Wraps the model's forward: raises once, on the first call after `arm()`."""

    def __init__(self, model):
        self.model, self.armed, self.forward = model, False, model.forward

    def __call__(self, *args, **kwargs):
        if self.armed:
            self.armed = False
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return self.forward(*args, **kwargs)


def test_a_failing_step_fails_its_requests_with_500_and_the_server_goes_on(model, monkeypatch):
    from engine.serving.app import create_app
    from engine.serving.config import ServeConfig
    from engine.serving.metrics import Metrics

    fault = FailOnce(model)
    monkeypatch.setattr(model, "forward", fault)
    tokenizer = ByteTokenizer(model.config.vocab_size)
    metrics = Metrics()
    runner = Runner(model, tokenizer)
    runner.batch = RankBatch(model, num_blocks=32, block_size=16)
    scheduler = ContinuousEngine(Coordinator(runner, world=1), metrics, tokenizer)
    scheduler.start()
    app = create_app(scheduler, ServeConfig(model="tiny-mixtral"), tokenizer, "tiny-mixtral", "decoder", metrics)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://tessera") as client:
            fault.armed = True
            failed = await client.post("/v1/completions", json={"prompt": "boom", "max_tokens": 4,
                                                                "temperature": 0})
            ok = await client.post("/v1/completions", json={"prompt": "hello tessera", "max_tokens": 6,
                                                            "temperature": 0})
            health = await client.get("/health")
            text = (await client.get("/metrics")).text
            return failed, ok, health, text

    try:
        failed, ok, health, text = asyncio.run(scenario())
    finally:
        scheduler.stop(timeout=30)
        runner.batch.close()
    assert failed.status_code == 500
    assert "illegal memory access" in failed.json()["error"]["message"]
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["text"] == tokenizer.decode(reference(model, tokenizer.encode("hello tessera"), 6))
    assert health.status_code == 200 and health.json()["status"] == "ok"
    used = {s.labels["rank"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "tessera_kv_blocks_used" for s in f.samples}
    assert used == {"0": 0.0}


def test_generate_streams_the_tokens_and_closing_it_frees_the_request(model):
    from engine.serving.batcher import Request

    tokenizer = ByteTokenizer(model.config.vocab_size)
    runner = Runner(model, tokenizer)
    runner.batch = RankBatch(model, num_blocks=32, block_size=16)
    scheduler = ContinuousEngine(Coordinator(runner, world=1), tokenizer=tokenizer)
    scheduler.start()
    prompt = list(range(10, 30))

    async def scenario():
        loop = asyncio.get_running_loop()
        full = Request("generate", prompt, loop, params=dict(max_tokens=8, temperature=0.0, logprobs=0))
        steps = [step async for step in scheduler.generate(full)]
        early = Request("generate", prompt, loop, params=dict(max_tokens=200, temperature=0.0))
        stream = scheduler.generate(early)
        first = await stream.__anext__()
        await stream.aclose()  # the consumer goes away after its first tokens
        return steps, first

    try:
        steps, first = asyncio.run(scenario())
        for _ in range(200):  # the cancellation lands at the next step
            if not scheduler.active:
                break
            time.sleep(0.05)
    finally:
        scheduler.stop(timeout=30)
        runner.batch.close()
    assert [t for step in steps for t in step.tokens] == reference(model, prompt, 8)
    assert all(len(step.logprobs) == len(step.tokens) for step in steps)
    assert first.tokens == reference(model, prompt, 8)[: len(first.tokens)] and first.logprobs is None
    assert not scheduler.active and runner.batch.stats()["blocks_free"] == 32


def test_rows_with_different_adapters_share_a_step(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))
    from lora_helpers import save_adapter

    base = engine.load("tiny-mixtral", device="cpu")
    folders = {name: save_adapter(base, tmp_path / name, seed=3 + i, targets=("q_proj", "v_proj", "o_proj"))
               for i, name in enumerate(("a", "b"))}
    lm = engine.load("tiny-mixtral", device="cpu", adapters=folders)
    prompt = list(range(10, 30))

    def alone(mixture):
        out = lm.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          adapter_weights=[mixture])
        return out[0, len(prompt):].tolist()

    want = {"a": alone({"a": 1.0}), "b": alone({"b": 1.0}), "mix": alone({"a": 0.5, "b": 0.5}), "base": alone({})}
    assert len({tuple(v) for v in want.values()}) > 1  # the adapters change the tokens
    batch = RankBatch(lm, num_blocks=16, block_size=16, eos_token_id=-1)
    for name, mixture in (("a", {"a": 1.0}), ("b", {"b": 1.0}), ("mix", {"a": 0.5, "b": 0.5}), ("base", {})):
        batch.add(name, prompt, max_tokens=6, adapters=mixture)
    got = {}
    while not batch.idle():
        for event in batch.step():
            got.setdefault(event["id"], []).extend(event["tokens"])
    batch.close()
    assert got == want


def test_waiting_requests_stay_in_the_bounded_queue_so_overload_is_refused_not_a_growing_backlog(model):
    """The scheduler takes from the queue only what the ranks have room to run: with one running slot and a
    queue of two, a fourth request is refused (503 in the server), and the three accepted all finish."""
    from engine.serving.batcher import Overloaded, Request
    from engine.serving.scheduler import _LocalRunner

    batch = RankBatch(model, num_blocks=8, block_size=16, step_tokens=32, max_requests=1)
    serving = ContinuousEngine(Coordinator(_LocalRunner(batch), world=1), max_queue=2, max_running_per_rank=1)
    serving.step()  # the ranks' first KV report
    requests = [Request("generate", list(p), None, params=dict(max_tokens=6, temperature=0.0), id=f"r{i}")
                for i, p in enumerate(PROMPTS[:4])]
    serving.submit(requests[0])
    serving._drain()
    serving.step()
    serving.submit(requests[1])
    serving.submit(requests[2])
    with pytest.raises(Overloaded):
        serving.submit(requests[3])
    serving._drain()
    assert serving.queue.qsize() == 2 and not serving.incoming  # the running slot is taken: they wait there
    while serving.active or serving.incoming or not serving.queue.empty():
        serving._drain()
        serving.step()
    batch.close()
    assert [r.result.tokens for r in requests[:3]] == [reference(model, p, 6) for p in PROMPTS[:3]]



def test_new_requests_go_where_less_prefill_is_pending_among_the_ranks_with_room():
    """A prompt still waiting for its first token makes its rank's next steps the longer ones (every rank waits
    for the slowest in the MoE collectives), so a new request goes to the rank with fewer such prompt tokens among
    those whose free KV blocks hold it; only when none has room does the one with the most free blocks take it."""
    from types import SimpleNamespace

    from engine.serving.batcher import Request

    coordinator = SimpleNamespace(world=2, runner=SimpleNamespace(model=object()))
    scheduler = ContinuousEngine(coordinator, max_running_per_rank=8)
    scheduler.kv = [dict(blocks_total=64, blocks_free=free, block_size=16) for free in (60, 40)]

    def place(prompt_tokens, max_tokens=16):
        request = Request("generate", [5] * prompt_tokens, None, params=dict(max_tokens=max_tokens))
        request.id = f"r{len(scheduler.active)}"
        scheduler.incoming.append(request)
        add = scheduler._place()
        return next(rank for rank in range(2) if add[rank]), request

    first_rank, first = place(300)  # no prefill pending anywhere: the most free blocks
    assert first_rank == 0
    assert place(40)[0] == 1  # rank 0 still prefills 300 prompt tokens
    first.first_token_at = time.perf_counter()  # its prefill is done: rank 1's 40 tokens are the pending ones
    assert place(40)[0] == 0
    scheduler.kv = [dict(blocks_total=64, blocks_free=free, block_size=16) for free in (2, 30)]
    assert place(40)[0] == 1  # rank 0 has less prefill pending but not the blocks for this request
    scheduler.kv = [dict(blocks_total=64, blocks_free=free, block_size=16) for free in (3, 1)]
    assert place(200)[0] == 0  # no rank has room: the most free blocks, where it waits the shortest


def test_a_model_served_under_inference_mode_still_runs_outside_it():
    """RankBatch.run steps under inference mode. What a step creates and keeps (here the MoE blocks' health
    flags, made at their first pass) must stay a normal tensor, or the next plain forward's in-place update of it
    fails."""
    fresh = engine.load("tiny-mixtral", device="cpu")  # its first pass is a served step
    engine.generate_batch(fresh, [PROMPTS[0]], max_new_tokens=2)
    with torch.no_grad():
        logits = fresh(input_ids=torch.tensor([PROMPTS[0]])).logits
    assert not logits.is_inference() and torch.isfinite(logits).all()

"""Switch encoder-decoders through the continuous scheduler (engine.serving.encdec_batch): requests joining at
any step get the tokens of `model.generate`, within a block budget; seeds, log-probabilities and LoRA mixtures per
request; a short request overtakes a long one; real 2-rank moeshard servers answer, with and without adapters."""
import copy
import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import engine
from engine.registry import register_model
from engine.serving.coordinator import Coordinator
from engine.serving.encdec_batch import EncDecBatch
from engine.serving.batcher import Request
from engine.serving.scheduler import ContinuousEngine, _LocalRunner
from test_scheduler_server import stream_events  # the SSE data lines of one streamed completion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))
from lora_helpers import save_adapter  # noqa: E402

LENGTHS = (3, 17, 9, 30, 5)


@pytest.fixture(scope="module")
def model():
    # tiny-switch with its own output head: the tied, rescaled head of the registry's tiny-switch repeats one token
    # for most prompts, which would make "the same tokens as generate" a weak check.
    register_model(name="tiny-switch-untied", family="switch_transformers", source="tiny",
                   options={"config": {"tie_word_embeddings": False}})
    return engine.load("tiny-switch-untied", device="cpu")


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(2, 96, (n,), generator=generator).tolist() for n in LENGTHS]


def reference(model, prompt, max_new_tokens, eos=None, **kwargs):
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, **kwargs)
    tokens = out[0, 1:].tolist()  # after the decoder start token
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def run(batch, joins: dict[int, list[tuple]], max_steps: int = 200):
    """Step `batch`, adding `joins[step]` (request id, prompt, keywords) at each step; tokens, finish reasons and
    the most requests seen waiting."""
    tokens, finish, most_waiting = {}, {}, 0
    for step in range(max_steps):
        for request_id, prompt, kwargs in joins.get(step, []):
            batch.add(request_id, prompt, **kwargs)
        for event in batch.step():
            assert event["error"] is None, event
            tokens.setdefault(event["id"], []).extend(event["tokens"])
            if event["finish"]:
                finish[event["id"]] = event["finish"]
        most_waiting = max(most_waiting, batch.stats()["waiting"])
        if step > max(joins) and batch.idle():
            return tokens, finish, most_waiting
    raise AssertionError(f"not done after {max_steps} steps")


def test_requests_joining_at_different_steps_get_the_tokens_of_generate(model, prompts):
    plain = [reference(model, p, 12) for p in prompts]
    assert len({tuple(t) for t in plain}) == len(prompts) and all(len(set(t)) > 1 for t in plain)
    eos = plain[1][4]  # a token some requests generate: they stop there, the others run to max_tokens
    want = [t[: t.index(eos)] if eos in t else t for t in plain]  # greedy with EOS: the same, cut at its first EOS
    # 8 blocks of 8 tokens; the five requests need 2, 4, 3, 5 and 2: some wait for others to finish
    batch = EncDecBatch(model, num_blocks=8, block_size=8, eos_token_id=eos)
    joins = {0: [("r0", prompts[0], {}), ("r1", prompts[1], {})], 2: [("r2", prompts[2], {})],
             3: [("r3", prompts[3], {})], 7: [("r4", prompts[4], {})]}
    joins = {step: [(r, p, {"max_tokens": 12}) for r, p, _ in rows] for step, rows in joins.items()}
    tokens, finish, most_waiting = run(batch, joins)
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == want
    assert {finish[f"r{i}"] for i in range(len(prompts))} == {"stop", "length"}
    assert most_waiting > 0
    assert batch.stats()["blocks_free"] == 8 and batch.self_mask.shape == batch.encoder_mask.shape == (0, 0)


def test_lora_mixtures_per_row_get_the_tokens_of_each_request_alone_and_of_peft(model, prompts, tmp_path):
    """Two adapters on every attention projection (self- and cross-attention, encoder and decoder): requests with
    different mixtures share the running batch and join at different steps, and each gets the tokens it gets
    alone through LoRAModel.generate; a single-adapter request gets PEFT's tokens."""
    from peft import PeftModel

    targets = ("q", "k", "v", "o")
    folders = {name: save_adapter(model, tmp_path / name, seed=40 + i, targets=targets)
               for i, name in enumerate("ab")}
    lm = engine.load("tiny-switch-untied", device="cpu", adapters=folders, adapter_options={"backend": "torch"})
    mixes = [{"a": 1.0}, {"b": 1.0}, {}, {"a": 0.3, "b": 0.7}, {"b": 1.0}]

    def alone(prompt, mix):
        out = lm.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          adapter_weights=[mix])
        return out[0, 1:].tolist()

    want = [alone(p, mix) for p, mix in zip(prompts, mixes)]
    assert len({tuple(t) for t in want}) == len(want)  # the adapters change what is generated
    for name in "ab":
        peft = PeftModel.from_pretrained(copy.deepcopy(model), str(folders[name])).eval()
        out = peft.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=10, do_sample=False,
                            eos_token_id=None)
        assert out[0, 1:].tolist() == alone(prompts[0], {name: 1.0})
    batch = EncDecBatch(lm, num_blocks=64, block_size=8, eos_token_id=-1)
    joins = {0: [0, 1], 2: [2, 3], 5: [4]}
    joins = {step: [(f"r{i}", prompts[i], {"max_tokens": 10, "adapters": mixes[i]}) for i in rows]
             for step, rows in joins.items()}
    tokens, _, _ = run(batch, joins)
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == want
    assert lm.cache.pinned("a") == lm.cache.pinned("b") == 0  # every step gave its adapters back
    eos, names = model.generation_config.eos_token_id, ["a", "b", None]  # offline, the same scheduler
    assert engine.generate_batch(lm, prompts[:3], max_new_tokens=10, adapters=names) == \
        [reference(lm, p, 10, eos=eos, adapter_weights=[{n: 1.0} if n else {}]) for p, n in zip(prompts, names)]


def generated_logprobs(model, prompt, max_new_tokens):
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, eos_token_id=None)
    return out.sequences[0, 1:].tolist(), [torch.log_softmax(step[0].float(), -1) for step in out.logits]


def test_padded_rows_have_the_logprobs_of_generate_and_a_cancelled_row_leaves(model, prompts):
    # "late" joins two steps after "kept": its decoder keys are left-padded by two, its 3-token prompt's cross-
    # attention keys right-padded to the 30-token one's; the longest prompt leaves mid-way and the slab is trimmed.
    batch = EncDecBatch(model, num_blocks=64, block_size=8, eos_token_id=-1)
    batch.add("gone", prompts[1], max_tokens=40)
    batch.add("kept", prompts[3], max_tokens=8, logprobs=2)
    tokens, entries = {}, {"kept": [], "late": []}
    for step in range(20):
        if step == 2:
            batch.add("late", prompts[0], max_tokens=8, logprobs=0)
        if step == 4:
            batch.cancel("gone")
        for event in batch.step():
            tokens.setdefault(event["id"], []).extend(event["tokens"])
            entries.get(event["id"], []).extend(event["logprobs"] or [])
    assert batch.idle() and len(tokens["gone"]) == 4
    for name, prompt, top in (("kept", prompts[3], 2), ("late", prompts[0], 0)):
        want_tokens, want = generated_logprobs(model, prompt, 8)
        assert tokens[name] == want_tokens
        for token, (logprob, alternatives), logprobs in zip(tokens[name], entries[name], want, strict=True):
            assert logprob == pytest.approx(logprobs[token].item(), abs=1e-4)
            assert [i for i, _ in alternatives] == (logprobs.topk(top).indices.tolist() if top else [])


def test_generate_batch_runs_switch_through_the_scheduler(model, prompts):
    # 16 prompt tokens per step and 2 running at most: the prompts join over several steps
    got = engine.generate_batch(model, prompts, max_new_tokens=10, step_tokens=16, max_running=2)
    assert got == [reference(model, p, 10, eos=model.generation_config.eos_token_id) for p in prompts]
    alone = engine.generate_batch(model, [prompts[2]], max_new_tokens=8, temperature=0.9, seed=11)[0]
    together = engine.generate_batch(model, [prompts[2], *prompts[3:]], max_new_tokens=8, temperature=0.9, seed=11)
    assert together[0] == alone
    assert engine.generate_batch(model, [prompts[2]], max_new_tokens=8, temperature=0.9, seed=12)[0] != alone


def test_a_short_request_submitted_while_a_long_one_runs_finishes_first(model, prompts):
    from engine.serving.batcher import Request

    batch = EncDecBatch(model, num_blocks=64, block_size=16, eos_token_id=-1)
    scheduler = ContinuousEngine(Coordinator(_LocalRunner(batch), world=1))
    scheduler.step()
    long = Request("generate", prompts[3], None, params=dict(max_tokens=24, temperature=0.0))
    short = Request("generate", prompts[0], None, params=dict(max_tokens=3, temperature=0.0))
    scheduler.submit(long)
    for _ in range(5):
        scheduler._drain()
        scheduler.step()
    assert 0 < len(long.generated) < 24
    scheduler.submit(short)
    while short.result is None:
        scheduler._drain()
        scheduler.step()
    assert long.result is None and long.id in scheduler.active
    assert short.result.tokens == reference(model, prompts[0], 3, eos=-1)
    while scheduler.active:
        scheduler.step()
    assert long.result.tokens == reference(model, prompts[3], 24, eos=-1)


def test_a_two_rank_moeshard_server_streams_switch_completions(server_factory):
    from engine.serving.tokenizer import ByteTokenizer

    server = server_factory("--model", "tiny-switch", "--strategy", "moeshard")
    switch = engine.load("tiny-switch", device="cpu")
    tokenizer = ByteTokenizer(switch.config.vocab_size)
    eos = switch.generation_config.eos_token_id

    def want(text, max_tokens):
        return tokenizer.decode(reference(switch, tokenizer.encode(text), max_tokens, eos=eos))

    assert server.client.get("/health").json()["kind"] == "seq2seq"
    threads, streams = [], []
    for _ in range(2):  # the second goes to the rank with more free blocks: the other one
        chunks, started = [], threading.Event()
        thread = threading.Thread(target=stream_events, args=(server, {"prompt": "the long one", "max_tokens": 32,
                                                                     "temperature": 0}, chunks, started))
        thread.start()
        assert started.wait(120)
        threads.append(thread)
        streams.append(chunks)
    metrics = text_string_to_metric_families(server.client.get("/metrics").text)
    used = {s.labels["rank"]: s.value for f in metrics if f.name == "tessera_kv_blocks_used" for s in f.samples}
    short = server.client.post("/v1/completions", json={"prompt": "short", "max_tokens": 3, "temperature": 0})
    long_done_when_short_answered = ["[DONE]" in chunks for chunks in streams]
    for thread in threads:
        thread.join(timeout=120)
    assert short.status_code == 200, short.text
    assert short.json()["choices"][0]["text"] == want("short", 3)
    assert long_done_when_short_answered == [False, False]
    texts = ["".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1]) for chunks in streams]
    assert texts == [want("the long one", 32)] * 2
    assert used["0"] > 0 and used["1"] > 0, used  # each rank held one of the long requests
    assert want("short", 8) == "L" * 8  # so a stop string ends it after three tokens
    stopped = server.client.post("/v1/completions", json={"prompt": "short", "max_tokens": 32, "stop": ["LLL"],
                                                           "temperature": 0}).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["choices"][0]["text"] == ""
    assert stopped["usage"]["completion_tokens"] == 3


def test_a_two_rank_moeshard_server_serves_switch_with_lora_adapters(server_factory, tmp_path):
    """Named adapters and the base model streamed together through the continuous scheduler on 2 ranks: each
    answer is what LoRAModel.generate gives that request alone."""
    from engine import TaskRouter
    from engine.serving.tokenizer import ByteTokenizer

    switch = engine.load("tiny-switch", device="cpu")
    folders = {name: save_adapter(switch, tmp_path / name, seed=50 + i, targets=("q", "k", "v", "o"))
               for i, name in enumerate(("upper", "lower"))}
    TaskRouter.build({"upper": ["SHOUT THIS"], "lower": ["whisper this"]}, adapters=folders).save(tmp_path / "router")
    server = server_factory("--model", "tiny-switch", "--strategy", "moeshard", "--adapters", str(tmp_path / "router"))
    lm = engine.load("tiny-switch", device="cpu", adapters=folders)
    tokenizer, eos = ByteTokenizer(switch.config.vocab_size), switch.generation_config.eos_token_id

    def want(text, adapter):
        tokens = lm.generate(input_ids=torch.tensor([tokenizer.encode(text)]), max_new_tokens=16, do_sample=False,
                             adapter_weights=[{adapter: 1.0} if adapter else {}])[0, 1:].tolist()
        return tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens)

    asks = [("one prompt", "upper"), ("one prompt", "lower"), ("one prompt", None), ("another", "lower")]
    assert len({want(text, adapter) for text, adapter in asks[:3]}) == 3  # the adapters change the answer
    threads, streams = [], []
    for text, adapter in asks:
        chunks, started = [], threading.Event()
        body = {"prompt": text, "max_tokens": 16, "temperature": 0, **({"adapter": adapter} if adapter else {})}
        threads.append(threading.Thread(target=stream_events, args=(server, body, chunks, started)))
        threads[-1].start()
        streams.append(chunks)
    for thread in threads:
        thread.join(timeout=120)
    texts = ["".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1]) for chunks in streams]
    assert texts == [want(text, adapter) for text, adapter in asks]
    metrics = text_string_to_metric_families(server.client.get("/metrics").text)
    free = {s.labels["rank"] for f in metrics if f.name == "tessera_kv_blocks_free" for s in f.samples}
    assert free == {"0", "1"}  # the continuous scheduler's paged budget on both ranks, not the static batcher


def test_a_failing_decoder_step_fails_its_requests_and_the_batch_goes_on(model, prompts, monkeypatch):
    forward, calls = model.forward, []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second decoder step
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fail_once)
    batch = EncDecBatch(model, num_blocks=16, block_size=8, eos_token_id=-1)
    batch.add("a", prompts[0], max_tokens=4)
    batch.add("b", prompts[2], max_tokens=4)
    first, failed = batch.step(), batch.step()
    assert [e["finish"] for e in first] == [None, None]
    assert [(e["id"], e["finish"]) for e in failed] == [("a", "error"), ("b", "error")]
    assert "illegal memory access" in failed[0]["error"] and batch.idle() and batch.stats()["blocks_free"] == 16
    tokens, _, _ = run(batch, {0: [("c", prompts[4], {"max_tokens": 4})]})
    assert tokens["c"] == reference(model, prompts[4], 4, eos=-1)


def test_in_lockstep_the_encoder_runs_only_at_steps_where_a_request_can_join(model, prompts):
    """With several ranks every rank runs the same forwards; rank 0's step says whether any request can start
    (placed now, or waiting on a rank), and only then do the ranks run the encoder (a dummy where nobody joins)."""
    batch = EncDecBatch(model, num_blocks=8, block_size=8, eos_token_id=-1, dummy_when_idle=True)
    encoder, encodes = batch.encoder, []
    batch.encoder = lambda **kwargs: encodes.append(kwargs["input_ids"].shape[0]) or encoder(**kwargs)
    scheduler = ContinuousEngine(Coordinator(_LocalRunner(batch), world=1), max_queue=8, max_running_per_rank=4)
    scheduler.step()
    scheduler.step()
    assert encodes == [1]  # the first step learns the encoder's output; then nothing placed, nothing waits
    # 2 + 2 blocks at step 0, 5 more at step 3 (of 8): that one waits on the rank until one of the first two is done
    joins, requests, encoding_steps = {0: (0, 2), 3: (3,)}, [], []
    for step in range(40):
        for i in joins.get(step, ()):
            requests.append(Request("generate", prompts[i], None, params={"max_tokens": 6}))
            scheduler.submit(requests[-1])
        scheduler._drain()
        before = len(encodes)
        scheduler.step()
        encoding_steps.append(len(encodes) > before)
        if step > 3 and not (scheduler.active or scheduler.incoming):
            break
    assert [r.result.tokens for r in requests] == [reference(model, prompts[i], 6, eos=-1) for i in (0, 2, 3)]
    joined = next(i for i in range(3, len(encoding_steps)) if not encoding_steps[i])  # the first step after it joins
    assert encoding_steps[:3] == [True, False, False] and joined > 4 and all(encoding_steps[3:joined])
    assert not any(encoding_steps[joined:]) and batch.stats()["blocks_free"] == 8


def test_with_several_ranks_a_failing_step_stops_the_rank_instead_of_leaving_peers_in_a_collective(
        model, prompts, monkeypatch):
    """`dummy_when_idle` (several ranks in lockstep): the other ranks may wait in this forward's collectives,
    so the rank must stop (the coordinator turns this into a server exit), not go on alone."""
    from engine.serving.coordinator import StepCannotPair
    forward, calls = model.forward, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fail_second)
    batch = EncDecBatch(model, num_blocks=16, block_size=8, eos_token_id=-1, dummy_when_idle=True)
    batch.add("a", prompts[0], max_tokens=4)
    batch.step()
    with pytest.raises(StepCannotPair, match="illegal memory access"):
        batch.step()

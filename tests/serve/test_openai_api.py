"""The OpenAI surface of the server (chat, completions, models; their fields, answers and errors), in process: the
FastAPI app over each real backend on one rank (the continuous scheduler and the static batcher), with
tiny-mixtral, checked against the model's own forward passes."""
import json
import random
import time

import pytest
import torch
from fastapi.testclient import TestClient

import engine
from engine.serving.app import create_app
from engine.serving.batcher import BatchEngine
from engine.serving.config import ServeConfig
from engine.serving.coordinator import Coordinator
from engine.serving.metrics import Metrics
from engine.serving.openai_protocol import ChatShape, CompletionShape, TextEvent, TextStream, sse
from engine.serving.paged_batch import RankBatch
from engine.serving.runner import Runner
from engine.serving.scheduler import ContinuousEngine
from engine.serving.tokenizer import ByteTokenizer

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
RENDERED = "<system>be brief\n<user>hello\n<assistant>"  # TEMPLATE applied to CHAT, by hand
CONTEXT = 128  # tiny-mixtral's max_position_embeddings


@pytest.fixture(scope="module")
def model():
    return engine.load("tiny-mixtral", device="cpu")


@pytest.fixture(scope="module", params=["continuous", "static"])
def backend(model, request):
    config = ServeConfig(model="tiny-mixtral", max_new_tokens=64)
    metrics, tokenizer = Metrics(), ByteTokenizer(model.config.vocab_size)
    runner = Runner(model, tokenizer)
    if request.param == "continuous":
        runner.batch = RankBatch(model, num_blocks=64, block_size=16)
        serving = ContinuousEngine(Coordinator(runner), metrics, tokenizer)
    else:
        serving = BatchEngine(Coordinator(runner), config, metrics)
    serving.start()
    yield serving, config, metrics
    serving.stop(timeout=30)
    if runner.batch is not None:
        runner.batch.close()


def make_client(backend, tokenizer, adapters=frozenset()):
    """A client whose requests all run on one event loop (the backend answers on the loop a request came from),
    as under uvicorn."""
    batch_engine, config, metrics = backend
    app = create_app(batch_engine, config, tokenizer, "tiny-mixtral", "decoder", metrics, adapters, CONTEXT)
    return TestClient(app)


@pytest.fixture(scope="module")
def client(backend, model):
    with make_client(backend, ByteTokenizer(model.config.vocab_size, TEMPLATE)) as client:
        yield client


def ids_of(text):
    return list(text.encode())


def greedy(model, prompt_ids, steps, presence=0.0, frequency=0.0):
    """Greedy decoding written out step by step, OpenAI's penalties applied to the generated tokens' logits."""
    ids, out = list(prompt_ids), []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
        logits = logits - frequency * counts - presence * (counts > 0).float()
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def decode(ids):
    return ByteTokenizer(128).decode(ids)


def events(response):
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_applies_the_template_and_answers_like_greedy_decoding(client, model):
    response = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": decode(greedy(model, ids_of(RENDERED), 8))}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": len(RENDERED), "completion_tokens": 8, "total_tokens": len(RENDERED) + 8}


def test_chat_stream_is_the_same_answer_in_chunks_with_usage_last(client):
    request = {"messages": CHAT, "max_completion_tokens": 8, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=request).json()
    response = client.post("/v1/chat/completions",
                           json={**request, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == \
        whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_logprobs_are_the_models_log_softmax(client, model):
    response = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 5, "temperature": 0,
                                                         "logprobs": True, "top_logprobs": 3})
    choice = response.json()["choices"][0]
    content = choice["logprobs"]["content"]
    generated = [c["bytes"][0] if c["bytes"] else 0 for c in content]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids_of(RENDERED) + generated])).logits[0].float()
    want = torch.log_softmax(logits[len(RENDERED) - 1:-1], dim=-1)
    assert len(content) == 5
    for step, entry in enumerate(content):
        assert entry["logprob"] == pytest.approx(want[step, generated[step]].item(), abs=1e-4)
        top_values, top_ids = want[step].topk(3)
        assert [t["bytes"] for t in entry["top_logprobs"]] == [[i] if i else [] for i in top_ids.tolist()]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top_values.tolist(), abs=1e-4)
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])  # greedy took the top one

    legacy = client.post("/v1/completions", json={"prompt": RENDERED, "max_tokens": 5, "temperature": 0,
                                                  "logprobs": 2}).json()["choices"][0]
    assert legacy["text"] == choice["message"]["content"]
    assert legacy["logprobs"]["token_logprobs"] == pytest.approx([c["logprob"] for c in content], abs=1e-5)
    lengths = [len(c["bytes"]) for c in content]
    assert legacy["logprobs"]["text_offset"] == [sum(lengths[:i]) for i in range(5)]
    assert all(len(top) == 2 for top in legacy["logprobs"]["top_logprobs"])


def test_streamed_logprobs_cover_every_token(client):
    request = {"messages": CHAT, "max_tokens": 6, "temperature": 0, "logprobs": True}
    whole = client.post("/v1/chat/completions", json=request).json()["choices"][0]["logprobs"]["content"]
    chunks = events(client.post("/v1/chat/completions", json={**request, "stream": True}))
    streamed = [entry for c in chunks for entry in (c["choices"][0]["logprobs"] or {"content": []})["content"]]
    assert streamed == whole


def test_penalties_follow_their_definition(client, model):
    prompt = ids_of(RENDERED)
    for presence, frequency in [(1.5, 0.0), (0.0, 2.0), (-1.0, 0.5)]:
        response = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 12, "temperature": 0,
                                                             "presence_penalty": presence,
                                                             "frequency_penalty": frequency})
        want = greedy(model, prompt, 12, presence, frequency)
        assert response.json()["choices"][0]["message"]["content"] == decode(want), (presence, frequency)
    assert greedy(model, prompt, 12, 0.0, 2.0) != greedy(model, prompt, 12)  # the penalty changed the answer


def test_n_choices_are_seeded_one_seed_each(client):
    request = {"prompt": "seeds", "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 7}
    first = client.post("/v1/completions", json=request).json()
    again = client.post("/v1/completions", json=request).json()
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert [c["text"] for c in again["choices"]] == texts
    assert len(set(texts)) > 1
    single = client.post("/v1/completions", json={**request, "n": 1, "seed": 8}).json()
    assert single["choices"][0]["text"] == texts[1]  # choice i samples with seed + i
    assert first["usage"]["completion_tokens"] == 24


def test_n_streamed_choices(client):
    request = {"messages": CHAT, "max_tokens": 5, "temperature": 0, "n": 2}
    chunks = events(client.post("/v1/chat/completions", json={**request, "stream": True}))
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
    whole = client.post("/v1/chat/completions", json=request).json()
    assert texts == [c["message"]["content"] for c in whole["choices"]]
    assert texts[0] == texts[1]  # greedy: both choices agree


def test_stop_string_cuts_the_answer_whole_and_streamed(client, model):
    generated = greedy(model, ids_of(RENDERED), 16)
    text = decode(generated)
    stop = text[5:8]
    cut = text.index(stop)
    request = {"messages": CHAT, "max_tokens": 16, "temperature": 0, "stop": [stop, "never appears"]}
    whole = client.post("/v1/chat/completions", json=request).json()
    assert whole["choices"][0]["message"]["content"] == text[:cut]
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == cut + len(stop)  # one byte a token: those that reached it
    chunks = events(client.post("/v1/chat/completions", json={**request, "stream": True}))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text[:cut]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_text_stream_holds_back_partial_stops_and_characters():
    tokenizer = ByteTokenizer(256)
    stream = TextStream(tokenizer.decode, ["END"])
    sent = [stream.add(t) for t in "abEN".encode()]
    assert sent == ["a", "b", "", ""]  # "EN" could become "END"
    assert stream.add(ord("x")) == "ENx"
    assert [stream.add(b) for b in "é".encode()] == ["", "é"]  # two bytes, one character
    assert [stream.add(t) for t in "yEND".encode()] == ["y", "", "", ""] and stream.stopped
    assert stream.text == "abENxéy" and stream.text_tokens() == 8 and len(stream.tokens) == 11


def _byte_level_bpe():
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.decoders import DecodeStream

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["héllo wörld, naïve café ✓ 日本語 " * 20, "the quick brown fox"], vocab_size=320,
                            min_frequency=1, show_progress=False)

    def decode_stream():
        stream = DecodeStream(skip_special_tokens=True)
        return lambda token_id: stream.step(bpe._tokenizer, token_id)

    return lambda ids: bpe.decode(ids, skip_special_tokens=True), decode_stream


def _wordpiece():
    from engine.models.minilm_moe import minilm_path
    from engine.serving.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(minilm_path())
    return tokenizer.decode, tokenizer.decode_stream


TOKENIZERS = {"bytes": lambda: (ByteTokenizer(256).decode, lambda: None), "byte-level BPE": _byte_level_bpe,
              "WordPiece": _wordpiece}
VOCAB = {"bytes": 320, "byte-level BPE": 320, "WordPiece": 30000}


@pytest.mark.parametrize("incremental", [False, True], ids=["decode", "DecodeStream"])
@pytest.mark.parametrize("tokenizer", list(TOKENIZERS))
def test_text_stream_spells_what_decoding_everything_spells_and_decodes_each_token_a_bounded_number_of_times(
        tokenizer, incremental):
    decode, decode_stream = TOKENIZERS[tokenizer]()
    if incremental and decode_stream() is None:
        pytest.skip("bytes have no incremental decoder")
    decoded = []

    def counting(ids):
        decoded.append(len(ids))
        return decode(ids)

    rng = random.Random(0)
    for trial in range(5):
        ids = [rng.randrange(1, VOCAB[tokenizer]) for _ in range(300)]
        stream, decoded[:] = TextStream(counting, [], decode_stream() if incremental else None), []
        text = "".join(stream.add(t) for t in ids) + stream.finish()
        assert text == decode(ids) == stream.text
        assert sum(decoded) < 20 * len(ids)  # decoding everything per token: about len(ids) ** 2 / 2
        if incremental:
            assert sum(decoded) <= len(ids)  # at most one whole decode, at the end inside a character


@pytest.mark.parametrize("tokenizer", ["byte-level BPE", "WordPiece"])
def test_text_stream_sends_the_same_text_with_and_without_an_incremental_decoder(tokenizer):
    """Stop strings, held-back text and the token counts behind them come out alike."""
    decode, decode_stream = TOKENIZERS[tokenizer]()
    rng = random.Random(1)
    for trial in range(40):
        ids = [rng.randrange(1, VOCAB[tokenizer]) for _ in range(rng.randint(1, 120))]
        whole = decode(ids)
        # stop strings from the answer, without U+FFFD: decode() also spells a character still being written so,
        # where the incremental decoder waits for its last byte
        stops = [whole[a:a + rng.randint(1, 4)] for a in rng.sample(range(len(whole)), min(2, len(whole)))] \
            if whole and trial % 4 else []
        stops = [s for s in stops if "\ufffd" not in s]
        streams = [TextStream(decode, stops), TextStream(decode, stops, decode_stream())]
        sent = [[], []]
        for token in ids:
            for stream, out in zip(streams, sent):
                if not stream.stopped:
                    out.append(stream.add(token))
        for stream, out in zip(streams, sent):
            out.append(stream.finish())
        plain, incremental = streams
        assert "".join(sent[0]) == "".join(sent[1]) == plain.text == incremental.text
        assert (plain.stopped, len(plain.tokens)) == (incremental.stopped, len(incremental.tokens))
        if "\ufffd" not in whole:  # a token inside a character starts at the character, or after decode()'s U+FFFD
            assert plain.text_tokens() == incremental.text_tokens()
        if stops and not plain.stopped:
            assert not any(s in whole for s in stops)


@pytest.mark.parametrize("clean_up", [False, True])
def test_served_tokenizer_encodes_and_decodes_as_transformers_does(tmp_path, clean_up):
    """HFTokenizer calls the Rust tokenizer directly where transformers' encode and decode would add nothing: the
    same ids for prompts longer than the tokenizer's saved truncation (MiniLM's 512), the same text back."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from engine.models.minilm_moe import minilm_path
    from engine.serving.tokenizer import HFTokenizer

    minilm = AutoTokenizer.from_pretrained(minilm_path(), clean_up_tokenization_spaces=clean_up)
    minilm.save_pretrained(tmp_path)
    served, reference = HFTokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(reference, PreTrainedTokenizerFast) and (served._decode_fast is None) == clean_up
    assert served._encode_fast is not None
    words = "Hello, world! naïve café ✓ 日本語 [SEP] [CLS] unbelievable tokenisation 42".split()
    rng = random.Random(0)
    for length in (1, 7, 900):
        text = " ".join(rng.choice(words) for _ in range(length))
        assert served.encode(text) == reference(text, add_special_tokens=True)["input_ids"]
    assert len(served.encode(text)) > 512
    for _ in range(20):
        ids = [rng.randrange(0, 30522) for _ in range(rng.randint(1, 40))] + [minilm.sep_token_id]
        assert served.decode(ids) == reference.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages"),
    ({"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": CHAT, "max_tokens": 4, "max_completion_tokens": 4}, "max_tokens"),
    ({"messages": CHAT, "n": 0}, "n"),
    ({"messages": CHAT, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": CHAT, "max_tokens": 1000}, "max_tokens"),
    ({"messages": CHAT, "max_tokens": 64, "adapter": "nope"}, "adapter"),
])
def test_bad_chat_requests_are_400_naming_the_field(client, body, param):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    if param == "response_format":
        assert error["message"].startswith("response_format: ")


def test_completion_unknown_field_is_400_naming_it(client):
    response = client.post("/v1/completions", json={"prompt": "x", "best_of": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "best_of"


def test_prompt_longer_than_the_context_is_413(client):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * CONTEXT}]})
    assert response.status_code == 413 and response.json()["error"]["param"] == "messages"
    assert "context is 128 tokens" in response.json()["error"]["message"]
    response = client.post("/v1/completions", json={"prompt": "x" * CONTEXT})
    assert response.status_code == 413 and response.json()["error"]["param"] == "prompt"


def test_completion_that_does_not_fit_the_context(client):
    prompt = "x" * (CONTEXT - 10)
    response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 11})
    assert response.status_code == 400 and "leaves 10" in response.json()["error"]["message"]
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt[:100]}],
                                                         "temperature": 0})
    assert response.status_code == 200  # no max_tokens: as many as the context leaves
    assert response.json()["usage"]["total_tokens"] == CONTEXT


def test_models_list_the_model_and_the_adapters_of_the_hook(backend, model):
    client = make_client(backend, ByteTokenizer(model.config.vocab_size, TEMPLATE))  # nothing is generated
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-mixtral"]
    client.app.state.adapter_names = lambda: {"greetings", "arithmetic"}  # as a pool that changes would
    cards = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in cards] == [("tiny-mixtral", None), ("arithmetic", "tiny-mixtral"),
                                                        ("greetings", "tiny-mixtral")]
    assert client.get("/v1/models/greetings").json()["object"] == "model"
    assert client.get("/v1/models/other").status_code == 404
    response = client.post("/v1/chat/completions", json={"messages": CHAT, "model": "other"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


def test_chat_without_a_template_says_how_to_give_one(backend, model):
    client = make_client(backend, ByteTokenizer(model.config.vocab_size))
    response = client.post("/v1/chat/completions", json={"messages": CHAT})
    assert response.status_code == 400 and "--chat-template" in response.json()["error"]["message"]


def test_a_template_that_rejects_the_conversation_is_400(backend, model):
    strict = "{% if messages[0].role != 'user' %}{{ raise_exception('the first turn must be the user') }}{% endif %}"
    client = make_client(backend, ByteTokenizer(model.config.vocab_size, strict))
    response = client.post("/v1/chat/completions", json={"messages": CHAT})
    assert response.status_code == 400 and "the first turn must be the user" in response.json()["error"]["message"]


def test_a_failed_step_is_500_naming_the_error_and_the_server_goes_on(client, model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    request = {"messages": CHAT, "max_tokens": 3, "temperature": 0}
    monkeypatch.setattr(model, "forward", broken)
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 500
    assert "kernel launch failed" in response.json()["error"]["message"]
    streamed = client.post("/v1/chat/completions", json={**request, "stream": True})
    assert "kernel launch failed" in streamed.text.splitlines()[-2]  # the error event, after the role chunk
    monkeypatch.undo()
    assert client.post("/v1/chat/completions", json=request).status_code == 200
    assert client.get("/health").json()["status"] == "ok"


def test_a_request_names_an_adapter_as_its_model(model, tmp_path):
    """As /v1/models lists them: `"model": "<adapter>"` generates with that adapter (the static batcher, which
    serves LoRA pools)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))
    from lora_helpers import save_adapter

    folders = {"arithmetic": save_adapter(model, tmp_path / "arithmetic", seed=7, targets=("q_proj", "v_proj"))}
    lm = engine.load("tiny-mixtral", device="cpu", adapters=folders)
    tokenizer = ByteTokenizer(lm.config.vocab_size, TEMPLATE)
    config, metrics = ServeConfig(model="tiny-mixtral", max_new_tokens=64), Metrics()
    serving = BatchEngine(Coordinator(Runner(lm, tokenizer)), config, metrics)
    serving.start()
    app = create_app(serving, config, tokenizer, "tiny-mixtral", "decoder", metrics, frozenset(folders), CONTEXT)
    try:
        with TestClient(app) as client:
            request = {"messages": CHAT, "max_tokens": 6, "temperature": 0}
            by_model = client.post("/v1/chat/completions", json={**request, "model": "arithmetic"}).json()
            by_field = client.post("/v1/chat/completions", json={**request, "adapter": "arithmetic"}).json()
            conflict = client.post("/v1/chat/completions", json={**request, "model": "arithmetic", "adapter": "auto"})
    finally:
        serving.stop(timeout=30)
    ids = torch.tensor([ids_of(RENDERED)])
    want = lm.generate(input_ids=ids, max_new_tokens=6, do_sample=False, adapter_weights=[{"arithmetic": 1.0}])
    assert by_model["model"] == "arithmetic"
    assert by_model["choices"][0]["message"]["content"] == decode(want[0, ids.shape[1]:].tolist())
    assert by_field["choices"][0]["message"]["content"] == by_model["choices"][0]["message"]["content"]
    assert conflict.status_code == 400 and conflict.json()["error"]["param"] == "adapter"


def test_a_transformers_tokenizer_applies_the_given_template_once():
    """A tokenizer that has no chat template of its own (all-MiniLM's) takes the server's; the template's text is
    tokenized without adding special tokens a second time."""
    from transformers import AutoTokenizer

    from engine.models.minilm_moe import minilm_path
    from engine.serving.tokenizer import NoChatTemplate, load_tokenizer

    with pytest.raises(NoChatTemplate, match="--chat-template"):
        load_tokenizer(minilm_path(), 30522).apply_chat_template(CHAT)
    ids = load_tokenizer(minilm_path(), 30522, TEMPLATE).apply_chat_template(CHAT)
    plain = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    assert ids == plain(RENDERED, add_special_tokens=False)["input_ids"]


def test_metrics_label_requests_by_route_not_by_raw_path(client):
    """Junk URLs share one label, and a path parameter is labelled by its route, so the label set stays bounded."""
    from prometheus_client.parser import text_string_to_metric_families
    for junk in ("/no/such/page", "/v1/nonsense?x=1", "/%2e%2e/etc/passwd"):
        assert client.get(junk).status_code == 404
    client.get("/v1/models/any-adapter-name")
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    endpoints = {s.labels["endpoint"] for s in families["tessera_requests"].samples}
    assert "unmatched" in endpoints and "/v1/models/{name:path}" in endpoints
    assert not any("nonsense" in e or "passwd" in e or "any-adapter-name" in e for e in endpoints)


def test_a_client_that_disconnects_cancels_its_non_streamed_completion(backend, model, monkeypatch):
    """The ASGI app called as uvicorn calls it, with a client that sends its request and goes away at once."""
    import asyncio
    serving, config, metrics = backend
    app = create_app(serving, config, ByteTokenizer(model.config.vocab_size), "tiny-mixtral", "decoder", metrics,
                     frozenset(), CONTEXT)
    submitted = []
    monkeypatch.setattr(serving, "submit", lambda request, submit=serving.submit: (submitted.append(request),
                                                                                    submit(request)))
    body = json.dumps({"prompt": "hello there", "max_tokens": 64}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # a disconnected client sends nothing more

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    loop = asyncio.new_event_loop()
    loop.run_until_complete(asyncio.wait_for(app(scope, receive, send), timeout=60))
    assert sent[0]["status"] == 499
    [request] = submitted
    assert request.cancelled and not request.future.done()
    # the loop stays open until the backend is done with the row, as uvicorn's does
    deadline = time.monotonic() + 60
    def with_the_backend():
        if isinstance(serving, ContinuousEngine):
            return request in serving.incoming or any(r is request for r, _ in serving.active.values())
        return not serving.queue.empty() or (request in serving._inflight and not request.future.done())

    while with_the_backend():
        assert time.monotonic() < deadline
        loop.run_until_complete(asyncio.sleep(0.05))
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()


class _InstantEngine:
    """Puts each request's whole answer on its stream as it is submitted: every token has arrived before the
    stream first wakes, as when the event loop falls behind the steps."""

    router = None

    def __init__(self, text: str):
        self.ids = list(text.encode())

    def submit(self, request):
        for i, token in enumerate(self.ids[: request.params["max_tokens"]]):
            request.tokens.put_nowait((token, (-0.5 - i, [(token, -0.5 - i)])))
        request.tokens.put_nowait(None)


def _events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_tokens_that_arrived_together_stream_as_one_event_per_choice_with_their_logprobs():
    """Tokens already there when the stream wakes go out as one event per choice (not one per token), with the
    same text, stop-string cut and log-probabilities as token by token."""
    config, tokenizer = ServeConfig(model="tiny-mixtral", max_new_tokens=64), ByteTokenizer(256)
    app = create_app(_InstantEngine("hello world"), config, tokenizer, "tiny-mixtral", "decoder", Metrics(),
                     frozenset(), CONTEXT)
    with TestClient(app) as client:
        body = {"prompt": "hi", "max_tokens": 20, "stream": True, "n": 2, "logprobs": 1, "stop": ["o w"]}
        with client.stream("POST", "/v1/completions", json=body) as response:
            events = _events(response)
    assert len(events) == 2  # one per choice, each with its finish reason
    for index in (0, 1):
        (event,) = [e for e in events if e["choices"][0]["index"] == index]
        choice = event["choices"][0]
        assert choice["text"] == "hell" and choice["finish_reason"] == "stop"
        assert choice["logprobs"]["tokens"] == list("hell")
        assert choice["logprobs"]["token_logprobs"] == [-0.5, -1.5, -2.5, -3.5]
        assert choice["logprobs"]["text_offset"] == [0, 1, 2, 3]


@pytest.mark.parametrize("shape", [CompletionShape(str), ChatShape(str)], ids=["completion", "chat"])
def test_a_pre_rendered_text_event_spells_what_rendering_the_whole_chunk_spells(shape):
    chunk = {"id": "cmpl-1", "object": shape.chunk_object, "created": 1, "model": f"a {TextEvent.MARK} model",
             "usage": None}  # the model name is the client's
    for index in (0, 3):
        make = lambda text: {**chunk, "choices": [shape.delta(index, text, None, None)]}  # noqa: E731
        event = TextEvent(make)
        for text in ["a", " b", 'quote " and \\ backslash', "naïve ✓ 日本語 \U0001F600", "\n\t\x00", "\0text\0"]:
            assert event(text) == sse(make(text))

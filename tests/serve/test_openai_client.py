"""The official `openai` Python client against a real 2-rank server (tiny-mixtral, expert parallel, an API key):
chat with and without streaming, completions, models, and the errors it raises."""
import httpx
import pytest
import torch

import engine
from engine.serving.tokenizer import ByteTokenizer

openai = pytest.importorskip("openai")

KEY = "tessera-test-key"
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
RENDERED = "<system>be brief\n<user>hello\n<assistant>"  # TEMPLATE applied to CHAT, by hand


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory):
    template = tmp_path_factory.mktemp("chat") / "template.jinja"
    template.write_text(TEMPLATE)
    return server_factory("--model", "tiny-mixtral", "--strategy", "ep", "--chat-template", str(template),
                          "--api-key", KEY)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=120, max_retries=0) as client:
        yield client


def single_process(prompt: str, tokens: int) -> str:
    model = engine.load("tiny-mixtral", device="cpu")
    tokenizer = ByteTokenizer(model.config.vocab_size)
    ids = torch.tensor([tokenizer.encode(prompt)])
    return tokenizer.decode(model.generate(input_ids=ids, max_new_tokens=tokens, do_sample=False)[0, ids.shape[1]:]
                            .tolist())


def test_chat_with_and_without_streaming(client):
    answer = client.chat.completions.create(model="tiny-mixtral", messages=CHAT, max_tokens=6, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == single_process(RENDERED, 6)
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(RENDERED), 6)

    stream = client.chat.completions.create(model="tiny-mixtral", messages=CHAT, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_completions_and_models(client):
    completion = client.completions.create(model="tiny-mixtral", prompt="hello tessera", max_tokens=5, temperature=0,
                                           logprobs=1)
    assert completion.choices[0].text == single_process("hello tessera", 5)
    assert len(completion.choices[0].logprobs.token_logprobs) == 5
    assert [m.id for m in client.models.list()] == ["tiny-mixtral"]


def test_errors_the_client_raises(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-mixtral", messages=CHAT, extra_body={"guided_json": {}})
    assert err.value.body["param"] == "guided_json"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-mixtral", messages=[])
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="tiny-mixtral", messages=[{"role": "user", "content": "x" * 200}])
    assert err.value.status_code == 413
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()


def test_every_v1_endpoint_needs_the_key_and_health_does_not(server):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                         ("POST", "/v1/embeddings")]:
        response = httpx.request(method, f"{server.url}{path}", json={})
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200

"""Completions with LoRA adapters through the server: a named adapter per request, or "auto" routing."""
import sys
from pathlib import Path

import pytest
import torch

import engine
from engine.serving.tokenizer import ByteTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))
from lora_helpers import save_adapter  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TASKS = {"arithmetic": ["What is 12 times 7?", "Add 5 and 9.", "Compute 81 divided by 9."],
         "greetings": ["Hello there, how are you?", "Good morning to you!", "Hi, nice to meet you."]}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from engine import TaskRouter

    root = tmp_path_factory.mktemp("pool")
    base = engine.load("tiny-mixtral", device="cpu")
    folders = {name: save_adapter(base, root / name, seed=7 + i, targets=TARGETS) for i, name in enumerate(TASKS)}
    router = TaskRouter.build(TASKS, adapters=folders)
    router.save(root / "router")
    return root / "router", folders, router


@pytest.fixture(scope="module")
def server(server_factory, pool):
    return server_factory("--model", "tiny-mixtral", "--strategy", "moeshard", "--adapters", str(pool[0]))


def expected(folders, prompt, mixture, max_tokens=5):
    lm = engine.load("tiny-mixtral", device="cpu", adapters=folders)
    tokenizer = ByteTokenizer(lm.config.vocab_size)
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = lm.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False, adapter_weights=[mixture])
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def complete(server, prompt, adapter):
    response = server.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                            "adapter": adapter})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_named_adapter_and_base_model(server, pool):
    _, folders, _ = pool
    assert complete(server, "Add 2 and 3.", "arithmetic") == expected(folders, "Add 2 and 3.", {"arithmetic": 1.0})
    assert complete(server, "Add 2 and 3.", None) == expected(folders, "Add 2 and 3.", {})


def test_auto_routes_like_the_router(server, pool):
    _, folders, router = pool
    prompt = "Good evening, friend!"
    decision = router.route([prompt])[0]
    assert decision.tasks[0] == "greetings"
    assert complete(server, prompt, "auto") == expected(folders, prompt, dict(decision.adapters))


def test_unknown_adapter_is_400_naming_the_field(server):
    response = server.client.post("/v1/completions", json={"prompt": "x", "adapter": "nope"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "adapter"

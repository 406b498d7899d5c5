"""A dense model (no MoE family) served like any other: a seeded tiny Llama saved with save_pretrained, a real
2-rank server started on its folder, completions equal to transformers' generation, and with two LoRA adapters
behind a router, completions equal to PEFT's."""
import copy
import sys
from pathlib import Path

import pytest
import torch

from engine.serving.tokenizer import ByteTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))
from lora_helpers import save_adapter  # noqa: E402

PROMPTS = ["hello dense", "Add 2 and 3."]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("dense")
    model.save_pretrained(root / "llama")
    model.config._name_or_path = str(root / "llama")
    folders = {n: save_adapter(model, root / n, seed=21 + i, targets=("q_proj", "v_proj", "down_proj"))
               for i, n in enumerate(["alpha", "beta"])}
    from engine import TaskRouter

    TaskRouter.build({n: [f"example {n} {i}" for i in range(3)] for n in folders}, adapters=folders,
                     k=1).save(root / "router")
    return model, root, folders


@pytest.fixture(scope="module")
def server(server_factory, llama):
    _, root, _ = llama
    return server_factory("--model", str(root / "llama"), "--strategy", "moeshard", "--adapters",
                          str(root / "router"))


def complete(server, prompt, adapter=None):
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
    if adapter is not None:
        body["adapter"] = adapter
    response = server.client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def greedy(model, prompt) -> str:
    tokenizer = ByteTokenizer(256)
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def test_a_dense_llama_folder_serves_what_transformers_generates(server, llama):
    model, _, _ = llama
    assert server.client.get("/health").json()["ranks"] == 2
    for prompt in PROMPTS:
        assert complete(server, prompt) == greedy(model, prompt)


def test_a_dense_llama_with_two_adapters_serves_what_peft_generates(server, llama):
    from peft import PeftModel

    model, _, folders = llama
    for name in ("alpha", "beta"):
        want = greedy(PeftModel.from_pretrained(copy.deepcopy(model), folders[name]).eval(), PROMPTS[1])
        assert complete(server, PROMPTS[1], name) == want
    assert complete(server, PROMPTS[1], "alpha") != complete(server, PROMPTS[1], "beta")

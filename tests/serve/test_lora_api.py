"""Serving a LoRA pool: adapters loaded and unloaded through vLLM's endpoints on a real 2-rank server, a device
budget smaller than a batch's adapters (sub-batches, no failures), and the refusals, each naming the adapter."""
import asyncio
import collections
import copy
import queue
import sys
import threading
import types
from pathlib import Path

import httpx
import pytest
import torch

import engine
from engine.lora import AdapterPool, attach_adapters
from engine.lora.cache import AdapterCache
from engine.serving.batcher import Request
from engine.serving.coordinator import Coordinator
from engine.serving.lora_api import run_pool_op, sub_batches
from engine.serving.runner import Runner
from engine.serving.tokenizer import ByteTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))
from lora_helpers import save_adapter, tiny_llama  # noqa: E402

TARGETS = ("q_proj", "v_proj")


# ---- in one process --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_pool")
    base = tiny_llama()
    folders = {n: save_adapter(base, root / n, seed=i + 3) for i, n in enumerate(["a", "b", "c"])}
    return base, folders


def _request(adapter, ids=(5, 6, 7, 8)):
    return Request("generate", list(ids), None, params={"max_tokens": 4, "temperature": 0.0, "top_p": 1.0,
                                                        "seed": 0}, adapter=adapter)


def test_sub_batches_fit_the_budget_and_give_the_same_tokens(llama_pool):
    base, folders = llama_pool
    one = AdapterCache.adapter_bytes(AdapterPool({"a": folders["a"]}), torch.float32)
    lm = attach_adapters(copy.deepcopy(base), folders, backend="torch", cache_bytes=2 * one + one // 2)
    assert lm.cache.capacity == 2
    mixes = [{"a": 1.0}, {"b": 1.0}, {"c": 1.0}, {}, {"a": 0.5, "b": 0.5}, {"a": 0.4, "b": 0.3, "c": 0.3},
             {"c": 1.0}]
    batch = [_request(next(iter(m), None)) for m in mixes]
    parts, rejected = sub_batches(batch, mixes, lm)
    assert [r for r, _ in rejected] == [batch[5]]
    assert "mixes 3 adapters" in str(rejected[0][1]) and rejected[0][1].status == 400
    placed = [r for part in parts for r, _ in part]
    assert sorted(map(id, placed)) == sorted(id(r) for i, r in enumerate(batch) if i != 5)
    for part in parts:
        assert len({n for _, m in part for n in m}) <= 2
    # each part through the budgeted cache gives what one batch gives with every adapter resident
    unbudgeted = attach_adapters(copy.deepcopy(base), folders, backend="torch")
    ids = torch.tensor([r.token_ids for r in batch])
    kept = [i for i in range(len(batch)) if i != 5]
    want = unbudgeted.generate(input_ids=ids[kept], max_new_tokens=4, do_sample=False, pad_token_id=0,
                               adapter_weights=[mixes[i] for i in kept])
    for part in parts:
        rows = [batch.index(r) for r, _ in part]
        got = lm.generate(input_ids=ids[rows], max_new_tokens=4, do_sample=False, pad_token_id=0,
                          adapter_weights=[m for _, m in part])
        torch.testing.assert_close(got, want[[kept.index(i) for i in rows]], rtol=0, atol=0)


def test_a_row_naming_an_unloaded_adapter_is_rejected_alone(llama_pool):
    base, folders = llama_pool
    lm = attach_adapters(copy.deepcopy(base), folders, backend="torch")
    lm.unload_adapter("b")
    batch = [_request("a"), _request("b")]
    parts, rejected = sub_batches(batch, [{"a": 1.0}, {"b": 1.0}], lm)
    assert [[r for r, _ in p] for p in parts] == [[batch[0]]]
    assert rejected[0][0] is batch[1] and rejected[0][1].status == 404 and "'b' was unloaded" in str(rejected[0][1])


def test_unload_is_refused_while_requests_wait_for_the_adapter(llama_pool):
    base, folders = llama_pool
    lm = attach_adapters(copy.deepcopy(base), folders, backend="torch")
    runner = Runner(lm, ByteTokenizer(96))
    fake = types.SimpleNamespace(queue=queue.Queue(), held=collections.deque(), coordinator=Coordinator(runner))
    fake.queue.put(_request("a"))
    result = run_pool_op(fake, {"type": "lora_unload", "name": "a"})
    assert result["status"] == 409 and "adapter 'a' is in use by 1 waiting request" in result["error"]
    assert lm.pool.names == ["a", "b", "c"]
    assert run_pool_op(fake, {"type": "lora_unload", "name": "b"}) == {}
    assert lm.pool.names == ["a", "c"]
    loaded = run_pool_op(fake, {"type": "lora_load", "name": "a", "path": str(folders["b"])})
    assert loaded["status"] == 400 and "adapter 'a' is already loaded" in loaded["error"]


def test_a_budget_below_the_routers_k_is_refused_at_start(llama_pool, tmp_path):
    from engine import TaskRouter
    from engine.serving.config import ServeConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from serve_moe import attach_pool

    base, folders = llama_pool
    TaskRouter.build({n: [f"example {n} {i}" for i in range(3)] for n in folders}, adapters=folders,
                     k=3).save(tmp_path / "router")
    one = AdapterCache.adapter_bytes(AdapterPool({"a": folders["a"]}), torch.float32)
    config = ServeConfig(adapters=str(tmp_path / "router"), lora_budget_bytes=2 * one)
    with pytest.raises(SystemExit, match="holds 2 adapter.* but the router mixes up to k=3"):
        attach_pool(copy.deepcopy(base), config)
    lm, router = attach_pool(copy.deepcopy(base), ServeConfig(adapters=str(tmp_path / "router"),
                                                              lora_budget_bytes=3 * one))
    assert lm.cache.capacity == 3 and router.k == 3


# ---- a real server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    base = engine.load("tiny-mixtral", device="cpu")
    folders = {n: save_adapter(base, root / n, seed=11 + i, targets=TARGETS) for i, n in enumerate(["alpha", "beta"])}
    wide = tiny_llama()  # twice as wide as the served model, saved as if trained on it
    wide = type(wide)(type(wide.config)(**{**wide.config.to_dict(), "hidden_size": 64, "intermediate_size": 96}))
    wide.config._name_or_path = base.config._name_or_path
    folders["wide"] = save_adapter(wide, root / "wide", seed=5, targets=TARGETS)
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((folders["alpha"] / "adapter_config.json").read_text())
    torch.save({}, pickled / "adapter_model.bin")
    folders["pickled"] = pickled
    one = AdapterCache.adapter_bytes(AdapterPool({"alpha": folders["alpha"]}), next(base.parameters()).dtype)
    return folders, one


@pytest.fixture(scope="module")
def server(server_factory, adapters):
    _, one = adapters
    # room for one adapter: a batch naming two must be split (the static batcher; the continuous scheduler's
    # pool is tested in test_scheduler_lora.py)
    return server_factory("--model", "tiny-mixtral", "--strategy", "moeshard", "--scheduler", "static",
                          "--enable-lora", "--lora-budget-bytes", str(one + one // 2), "--max-wait-ms", "300")


def expected(folders, prompt, mixture, max_tokens=5):
    lm = engine.load("tiny-mixtral", device="cpu", adapters={n: folders[n] for n in ("alpha", "beta")})
    tokenizer = ByteTokenizer(lm.config.vocab_size)
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = lm.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False, adapter_weights=[mixture])
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def load(server, name, path):
    return server.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def unload(server, name):
    return server.client.post("/v1/unload_lora_adapter", json={"lora_name": name})


def model_ids(server):
    return [m["id"] for m in server.client.get("/v1/models").json()["data"]]


def completions(server, jobs):
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            responses = await asyncio.gather(*(client.post("/v1/completions", json={
                "prompt": prompt, "max_tokens": 5, "temperature": 0, "adapter": adapter})
                for prompt, adapter in jobs))
        return responses

    return asyncio.run(run())


def test_loaded_adapters_serve_one_batch_in_sub_batches(server, adapters):
    folders, _ = adapters
    assert "alpha" not in model_ids(server)
    for name in ("alpha", "beta"):
        response = load(server, name, folders[name])
        assert response.status_code == 200, response.text
    models = server.client.get("/v1/models").json()["data"]
    assert {"alpha", "beta"} <= {m["id"] for m in models}
    jobs = [("Add 2 and 3.", "alpha"), ("Add 2 and 3.", "beta"), ("Hello there", None), ("Hello there", "alpha")]
    for (prompt, adapter), response in zip(jobs, completions(server, jobs)):
        assert response.status_code == 200, response.text
        mixture = {adapter: 1.0} if adapter else {}
        assert response.json()["choices"][0]["text"] == expected(folders, prompt, mixture)


@pytest.mark.parametrize("name,folder,status,message", [
    ("alpha", "beta", 400, "adapter 'alpha' is already loaded"),
    ("wide", "wide", 400, "adapter 'wide': module model.layers.0.self_attn.q_proj has shape"),
    ("pickled", "pickled", 400, "adapter 'pickled': .*pickled adapter_model.bin files are refused"),
    ("ghost", None, 400, "adapter 'ghost': lora_path '/nonexistent' is not a directory"),
])
def test_bad_loads_name_the_adapter_and_change_nothing(server, adapters, name, folder, status, message):
    import re

    folders, _ = adapters
    if "alpha" not in model_ids(server):
        assert load(server, "alpha", folders["alpha"]).status_code == 200
    before = model_ids(server)
    response = load(server, name, folders[folder] if folder else "/nonexistent")
    assert response.status_code == status, response.text
    assert re.search(message, response.json()["error"]["message"]), response.text
    assert model_ids(server) == before
    ok = completions(server, [("Add 2 and 3.", "alpha")])[0]
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected(folders, "Add 2 and 3.",
                                                                                 {"alpha": 1.0})


def test_unload_waits_for_the_running_batch(server, adapters):
    folders, _ = adapters
    if "beta" not in model_ids(server):
        assert load(server, "beta", folders["beta"]).status_code == 200
    done = {}
    worker = threading.Thread(target=lambda: done.update(r=completions(server, [("Add 2 and 3.", "beta")])[0]))
    worker.start()
    response = unload(server, "beta")
    worker.join()
    assert response.status_code == 200, response.text
    assert done["r"].status_code in (200, 400, 404), done["r"].text  # ran before the unload, or refused after it
    if done["r"].status_code == 200:
        assert done["r"].json()["choices"][0]["text"] == expected(folders, "Add 2 and 3.", {"beta": 1.0})
    assert "beta" not in model_ids(server)
    gone = unload(server, "beta")
    assert gone.status_code == 404 and "adapter 'beta' is not loaded" in gone.json()["error"]["message"]
    after = completions(server, [("Add 2 and 3.", "beta")])[0]
    assert after.status_code == 400 and after.json()["error"]["param"] == "adapter"

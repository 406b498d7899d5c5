"""Adapter cache: byte accounting, LRU eviction, pins, and identical outputs after eviction and reload."""
import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engine.lora import AdapterCache, AdapterPool, CacheFullError, attach_adapters


def test_budget_accounting_and_lru(adapter_dirs):
    pool = AdapterPool(adapter_dirs)
    per = AdapterCache.adapter_bytes(pool, torch.float32)
    assert per == 2 * 4 * ((32 + 32) + (32 + 16)) * 4  # 2 layers x r=4 x (q 32->32, v 32->16) x fp32
    cache = AdapterCache(pool, "cpu", torch.float32, budget_bytes=2 * per + per // 2)
    assert cache.capacity == 2 and cache.bytes_reserved == 2 * per
    cache.release(cache.acquire(["alpha"]))
    cache.release(cache.acquire(["beta"]))
    cache.release(cache.acquire(["alpha"]))  # alpha becomes most recent
    assert cache.bytes_used == 2 * per and cache.hits == 1
    cache.release(cache.acquire(["gamma"]))  # evicts beta, the least recently used
    assert cache.resident() == ["alpha", "gamma"] and cache.evictions == 1 and cache.loads == 3
    with pytest.raises(CacheFullError, match="cannot hold one adapter"):
        AdapterCache(pool, "cpu", torch.float32, budget_bytes=per - 1)


def test_pinned_adapters_are_never_evicted(adapter_dirs):
    pool = AdapterPool(adapter_dirs)
    cache = AdapterCache(pool, "cpu", torch.float32, budget_bytes=2 * AdapterCache.adapter_bytes(pool, torch.float32))
    running = cache.acquire(["alpha"])  # a batch in flight
    a_stack, _ = cache.stacks("model.layers.0.self_attn.q_proj")
    snapshot = a_stack[running["alpha"]].clone()
    for name in ["beta", "gamma", "delta"]:  # other requests cycle through the one free slot
        cache.release(cache.acquire([name]))
    assert torch.equal(a_stack[running["alpha"]], snapshot)
    with pytest.raises(CacheFullError, match="needs 2 more adapters"):
        cache.acquire(["beta", "gamma"])
    cache.release(["alpha"])
    assert set(cache.acquire(["beta", "gamma"])) == {"beta", "gamma"}


def test_eviction_and_reload_give_identical_outputs(llama, adapter_dirs):
    pool = AdapterPool(adapter_dirs)
    ids = torch.randint(3, 96, (2, 5))
    budget = 2 * AdapterCache.adapter_bytes(pool, torch.float32)
    small = attach_adapters(copy.deepcopy(llama), pool, cache_bytes=budget)
    full = attach_adapters(copy.deepcopy(llama), pool)
    batches = [[{"alpha": 0.5, "beta": 0.5}, {"alpha": 1.0}], [{"gamma": 1.0}, {"delta": 0.2, "gamma": 0.8}],
               [{"alpha": 0.5, "beta": 0.5}, {"alpha": 1.0}]]
    for mixes in batches:
        torch.testing.assert_close(small(input_ids=ids, adapter_weights=mixes).logits,
                                   full(input_ids=ids, adapter_weights=mixes).logits, rtol=0, atol=0)
    assert small.cache.evictions == 4 and small.cache.bytes_used == budget
    with pytest.raises(CacheFullError):
        small(input_ids=ids, adapter_weights=[{"alpha": 0.3, "beta": 0.3, "gamma": 0.4}, {}])


def test_concurrent_requests_with_evictions_match_serial_results(llama, adapter_dirs):
    pool = AdapterPool(adapter_dirs)
    lm = attach_adapters(copy.deepcopy(llama), pool, cache_bytes=2 * AdapterCache.adapter_bytes(pool, torch.float32))
    ids = torch.randint(3, 96, (1, 5))
    requests = [[{name: 1.0}] for name in ["alpha", "beta", "gamma", "delta"] * 3]
    serial = [lm(input_ids=ids, adapter_weights=r).logits for r in requests]
    with ThreadPoolExecutor(max_workers=4) as pool_:
        threaded = list(pool_.map(lambda r: lm(input_ids=ids, adapter_weights=r).logits, requests))
    for got, expected in zip(threaded, serial):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert lm.cache.evictions > 0

"""Single-process pieces: range splitting, row packing, DeepSpeed's capacity rule, the cost model's choice."""
import pytest
import torch

from parallel_checks import deepspeed_keep
from engine.parallel.cost_model import CostModel, LayerShape, Linear
from engine.parallel.expert_parallel import capacity_slots, deepspeed_capacity
from engine.parallel.rows import pack_rows, unpack_rows
from engine.parallel.runtime import split_range


@pytest.mark.parametrize("total,parts", [(40, 3), (4, 3), (3072, 4), (5, 8)])
def test_split_range_covers_everything_once_with_uneven_remainders(total, parts):
    ranges = [split_range(total, parts, i) for i in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_pack_rows_round_trips_mixed_dtypes_as_views():
    h = torch.randn(5, 7, dtype=torch.bfloat16)
    ids = torch.randint(0, 9, (5, 3))
    w = torch.rand(5, 3)
    buffer = pack_rows(h, ids, w)
    out = unpack_rows(buffer, [(7, torch.bfloat16), (3, torch.int64), (3, torch.float32)])
    for got, want in zip(out, (h, ids, w)):
        assert torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert pack_rows(h[:0], ids[:0], w[:0]).shape == (0, buffer.shape[1])


def test_deepspeed_capacity_formula():
    assert deepspeed_capacity(rows=100, num_experts=8, top_k=1, capacity_factor=1.0, min_capacity=4) == 13
    assert deepspeed_capacity(rows=100, num_experts=8, top_k=2, capacity_factor=1.25, min_capacity=4) == 32
    assert deepspeed_capacity(rows=6, num_experts=8, top_k=1, capacity_factor=1.0, min_capacity=4) == 4


@pytest.mark.parametrize("top_k,capacity", [(1, 3), (2, 4), (2, 1)])
def test_capacity_slots_follow_deepspeed_priority(top_k, capacity):
    g = torch.Generator().manual_seed(top_k * 10 + capacity)
    ids = torch.stack([torch.randperm(6, generator=g)[:top_k] for _ in range(20)])
    ids[3, 0] = 6  # dropped by the router already (id E): never kept, never counted
    slot, kept = capacity_slots(ids, 6, capacity)
    assert kept.tolist() == deepspeed_keep(ids.tolist(), 6, capacity)
    assert len(set(slot[kept].tolist())) == int(kept.sum())  # no two kept pairs share a slot
    assert (slot[kept] // capacity == ids[kept]).all()


def test_cost_model_prefers_moeshard_under_skew_and_ep_for_large_even_batches():
    shape = LayerShape(8, 1, 64, 256, False, torch.float32, torch.float32)
    # MoEShard: low fixed cost, more bytes per row; EP: a host sync, cheaper per row while routing is even.
    model = CostModel(4, {shape: Linear(1e-4, 4e-7)}, {shape: (5e-4, 5e-8, 2e-7)})
    rows = 100
    assert model.predict(shape, rows, pairs=4 * rows, busiest=rows).choice == "moeshard"
    rows = 50_000
    assert model.predict(shape, rows, pairs=4 * rows, busiest=rows).choice == "ep"
    assert model.predict(shape, rows, pairs=4 * rows, busiest=4 * rows).choice == "moeshard"

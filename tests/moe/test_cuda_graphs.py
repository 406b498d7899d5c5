"""CUDA-graph decode: a captured MoE layer replays what eager computes, and generate() with graphed decode
steps gives the eager tokens. The capture tests need a GPU; on CPU we check what graphed decode changes besides
the graphs (the static KV cache) and the bad-input errors."""
import pytest
import torch

import engine
from engine.moe.graphs import GraphedLayer, decode_bucket, enable_graphed_decode
from engine.moe.patch import moe_blocks, routing_counts, track_routing


def greedy(model, ids, new_tokens=6):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)


def prompts(device, batch=2, length=5):
    return torch.randint(2, 90, (batch, length), generator=torch.Generator().manual_seed(3)).to(device)


def test_cuda_graphs_need_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA device"):
        engine.load("tiny-mixtral", device="cpu", cuda_graphs=True)


def test_batches_pad_to_the_smallest_bucket():
    assert [decode_bucket(b) for b in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, None]


def test_static_cache_decode_gives_the_eager_tokens():
    """What graphed decode runs, minus the graphs (CPU does not compile): the same greedy tokens."""
    model = engine.load("tiny-mixtral", backend="torch", device="cpu")
    ids = prompts("cpu")
    want = greedy(model, ids)
    enable_graphed_decode(model, max_cache_len=64)
    assert model.generation_config.cache_implementation == "static"
    assert torch.equal(greedy(model, ids), want)


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["single", "moeshard"])
def test_captured_moe_layer_replays_eager(strategy):
    from engine.parallel.runtime import Dist
    from engine.parallel.strategy import install_executors, plan_parts

    model = engine.load("tiny-mixtral", backend="triton", device="cuda", dtype="bfloat16")
    if strategy == "moeshard":  # MoEShard at one rank: the sharded path with nothing to exchange
        dist = Dist(None, 0, 1, "nccl", torch.device("cuda", torch.cuda.current_device()))
        plan_parts(model, strategy, dist, meta=False)
        install_executors(model, strategy, dist)
    track_routing(model)
    _, block = moe_blocks(model)[0]
    hidden_size = model.config.hidden_size
    for batch in (1, 16):
        graphed = GraphedLayer(block, torch.randn(batch, 1, hidden_size, device="cuda", dtype=torch.bfloat16))
        before = sum(sum(c) for c in routing_counts(model).values())
        for seed in range(3):
            x = torch.randn(batch, 1, hidden_size, device="cuda", dtype=torch.bfloat16,
                            generator=torch.Generator("cuda").manual_seed(seed))
            replayed = graphed(x).clone()
            with torch.no_grad():
                eager = block(x)
            torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
        after = sum(sum(c) for c in routing_counts(model).values())
        assert after - before == 2 * 3 * batch * model.config.num_experts_per_tok  # replays count too


@pytest.mark.cuda
def test_graphed_decode_generates_the_eager_tokens():
    ids = prompts("cuda")
    want = greedy(engine.load("tiny-mixtral", backend="triton", device="cuda"), ids)
    model = engine.load("tiny-mixtral", backend="triton", device="cuda", cuda_graphs=True)
    assert torch.equal(greedy(model, ids), want)

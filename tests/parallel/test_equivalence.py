"""Every strategy gives each rank the output the single-process model gives for that rank's own batch, for
every family, with a different token count on every rank, on 2 and 3 ranks (uneven slices and expert counts)."""
import pytest
import torch

from engine.families import FAMILIES
from harness import run_ranks

STRATEGIES = ("moeshard", "ep", "ep-capacity", "auto")


def _compare_all(rank, world, strategies, backend):
    from engine.parallel import apply_strategy
    from models import build, forward, rank_inputs

    errors = {}
    for family in FAMILIES:
        inputs = rank_inputs(family, rank)
        reference = forward(build(family, backend), inputs)
        for strategy in strategies:
            # A capacity factor this large drops nothing, so ep-capacity must match too.
            model = apply_strategy(build(family, backend), strategy, capacity_factor=100.0, stats=True)
            out = forward(model, inputs)
            state = model.tessera_parallel
            errors[(family, strategy)] = (((out - reference).abs().max() / reference.abs().max()).item(),
                                          state.sync.host_syncs, state.stats.tokens_dropped)
    return errors


@pytest.mark.parametrize("world", [2, 3])
def test_strategies_match_single_process(world):
    for rank_errors in run_ranks(_compare_all, world, STRATEGIES, "torch", limit_s=150):
        for (family, strategy), (error, syncs, dropped) in rank_errors.items():
            assert error < 1e-5, f"{family}/{strategy}: relative error {error}"
            assert syncs == 1, f"{family}/{strategy}: {syncs} host synchronisations in one forward pass"
            assert dropped == 0


def _moeshard_triton(rank, world):
    from engine.parallel import apply_strategy
    from models import build, forward, rank_inputs

    inputs = rank_inputs("qwen3_moe", rank)
    reference = forward(build("qwen3_moe", "reference"), inputs)
    out = forward(apply_strategy(build("qwen3_moe", "triton"), "moeshard"), inputs)
    return ((out - reference).abs().max() / reference.abs().max()).item()


def test_moeshard_with_triton_slice_kernels():
    for error in run_ranks(_moeshard_triton, 2, limit_s=120):
        assert error < 1e-5


def _empty_rank(rank, world):
    """Rank 1 calls an MoE layer with no tokens at all: it still joins every collective, and rank 0's output is
    the single-process one. (Whole Hugging Face models cannot run an empty batch; generation gives such a rank
    a dummy row, see test_generation.)"""
    from engine.parallel import apply_strategy
    from models import build

    hidden = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(7))
    if rank == 1:
        hidden = hidden[:0]
    reference = build("mixtral").model.layers[0].mlp(hidden)
    results = {}
    for strategy in STRATEGIES:
        block = apply_strategy(build("mixtral"), strategy, capacity_factor=100.0).model.layers[0].mlp
        out = block(hidden)
        results[strategy] = (tuple(out.shape), (out - reference).abs().max().item() if out.numel() else 0.0)
    return results


def test_rank_without_tokens_joins_collectives():
    rank0, rank1 = run_ranks(_empty_rank, 2, limit_s=120)
    for strategy in STRATEGIES:
        assert rank0[strategy][0] == (3, 5, 32) and rank0[strategy][1] < 1e-5
        assert rank1[strategy][0] == (0, 5, 32)

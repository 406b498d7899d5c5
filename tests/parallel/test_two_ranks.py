"""Two gloo ranks, the path N GPUs take with NCCL. One process group runs every check (see
`checks.two_rank_session`); each test asserts one property of what the ranks returned."""
import pytest

import parallel_checks as checks
from parallel_expect import assert_rank_local_reads
from engine.families import FAMILIES
from parallel_harness import run_ranks


@pytest.fixture(scope="module")
def ranks(checkpoints):
    return run_ranks(checks.two_rank_session, 2, checkpoints, limit_s=140)


def test_every_strategy_matches_single_process_for_every_family(ranks):
    for rank in ranks:
        results = rank["equivalence"]
        assert set(results) == {(f, s) for f in FAMILIES for s in checks.STRATEGIES}
        for (family, strategy), (error, syncs, dropped) in results.items():
            assert error < 1e-5, f"{family}/{strategy}: relative error {error}"
            assert syncs == 1, f"{family}/{strategy}: {syncs} host synchronisations in one forward pass"
            assert dropped == 0


def test_encoder_only_model_returns_hidden_states(ranks):
    for rank in ranks:
        for strategy, (error, syncs) in rank["encoder"].items():
            assert error < 1e-5 and syncs == 1, strategy


def test_bf16_models_match_single_process_within_bf16_rounding(ranks):
    for rank in ranks:
        for key, error in rank["bf16"].items():
            assert error < 1e-2, key  # partial sums over slices round differently from one full GEMM


def test_moeshard_runs_the_triton_slice_kernels(ranks):
    for rank in ranks:
        assert rank["triton"] < 1e-5


def test_moeshard_large_batch_path_gathers_hidden_states_unpacked(ranks):
    for rank in ranks:
        assert rank["unpacked"] < 1e-5


def test_auto_runs_the_path_its_cost_model_picks_with_global_expert_counts(ranks):
    total_pairs = sum(rank["auto"][1][1] for rank in ranks)
    for rank in ranks:
        results, (pairs_seen, _) = rank["auto"]
        for favoured, (choices, error) in results.items():
            assert set(choices) == {favoured}
            assert error < 1e-5
        assert pairs_seen == total_pairs  # Mixtral is top-2: every rank sees both ranks' pairs


def test_rank_without_tokens_still_joins_the_collectives(ranks):
    rank0, rank1 = (r["empty_rank"] for r in ranks)
    for strategy in checks.STRATEGIES:
        assert rank0[strategy][0] == (3, 5, 32) and rank0[strategy][1] < 1e-5
        assert rank1[strategy][0] == (0, 5, 32)


def test_ep_capacity_drops_exactly_as_deepspeed(ranks):
    for rank in ranks:
        error, dropped, expected, capacity = rank["capacity"]
        assert expected > 0, "the test must over-subscribe some expert"
        assert dropped == expected
        assert error < 1e-5


def test_no_layer_waits_on_the_host_only_the_pass_agreement_does(ranks):
    """MoE layers of every strategy run under a dispatch mode that raises on host synchronisations; the one
    agreement per forward pass is counted."""
    for rank in ranks:
        for strategy, (error, agreements) in rank["no_sync"].items():
            assert error < 1e-5, strategy
            assert agreements == 1, f"{strategy}: {agreements} host synchronisations in one forward pass"


def test_rank_local_loading_reads_only_this_ranks_part(ranks, checkpoints):
    assert_rank_local_reads([r["loading"] for r in ranks], checkpoints)


@pytest.mark.parametrize("family", ["qwen3_moe", "switch_transformers"])
def test_generation_in_lockstep_with_uneven_work(ranks, family):
    for rank in ranks:
        outputs, reference = rank["generation"][family]
        for strategy, sequences in outputs.items():
            assert sequences.tolist() == reference.tolist(), strategy

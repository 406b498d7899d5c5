"""Three ranks: uneven FFN slices and expert counts per rank, rank-local loading of uneven parts, and a rank
with no prompts joining generation (`checks.three_rank_session`)."""
import pytest

import parallel_checks as checks
from parallel_expect import assert_rank_local_reads
from engine.families import FAMILIES
from parallel_harness import run_ranks


@pytest.fixture(scope="module")
def ranks(checkpoints):
    return run_ranks(checks.three_rank_session, 3, checkpoints, limit_s=140)


def test_strategies_with_uneven_remainders_match_single_process(ranks):
    for rank in ranks:
        results = rank["equivalence"]
        assert set(results) == {(f, s) for f in FAMILIES for s in ("moeshard", "ep", "auto")}
        for (family, strategy), (error, syncs, _) in results.items():
            assert error < 1e-5, f"{family}/{strategy}: relative error {error}"
            assert syncs == 1


def test_rank_local_loading_of_uneven_parts(ranks, checkpoints):
    assert_rank_local_reads([r["loading"] for r in ranks], checkpoints)


def test_generation_with_a_rank_that_has_no_prompts(ranks):
    for index, rank in enumerate(ranks):
        outputs, reference = rank["generation"]
        for strategy, sequences in outputs.items():
            assert sequences.tolist() == reference.tolist(), (index, strategy)

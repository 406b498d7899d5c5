"""Three ranks: uneven slices of the FFN width and uneven expert counts per rank, and a rank with no prompts
joining generation."""
from engine.families import FAMILIES
from harness import run_ranks
import checks


def test_strategies_with_uneven_remainders_match_single_process():
    strategies = ("moeshard", "ep", "auto")
    for rank_results in run_ranks(checks.equivalence, 3, strategies, limit_s=150):
        assert set(rank_results) == {(f, s) for f in FAMILIES for s in strategies}
        for (family, strategy), (error, syncs, _) in rank_results.items():
            assert error < 1e-5, f"{family}/{strategy}: relative error {error}"
            assert syncs == 1


def test_generation_with_a_rank_that_has_no_prompts():
    plans = [(2, 4, 3), (1, 6, 5), (0, 4, 3)]
    for rank, (outputs, reference) in enumerate(run_ranks(checks.lockstep_generation, 3, "mixtral", plans,
                                                          limit_s=150)):
        for strategy, sequences in outputs.items():
            assert sequences.tolist() == reference.tolist(), (rank, strategy)

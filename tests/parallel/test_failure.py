"""A rank that dies or stalls makes the others raise within the collective timeout instead of hanging."""
import pytest

from harness import run_ranks_raw
import checks


@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_failing_rank_raises_on_every_rank(mode):
    outcomes = run_ranks_raw(checks.fail_or_stall, 2, mode, limit_s=60, timeout_s=5)
    status0, value0 = outcomes[0]
    assert status0 == "ok", value0
    what, error, seconds = value0
    assert what == "raised", "the surviving rank must raise, not return"
    assert seconds < 30, f"rank 0 took {seconds:.0f}s to notice"
    if mode == "raise":
        assert outcomes[1][0] == "error" and "injected failure" in outcomes[1][1]

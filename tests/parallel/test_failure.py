"""A rank that dies or stalls makes every rank raise within the collective timeout instead of hanging."""
import pickle

import pytest

import parallel_checks as checks
from parallel_harness import run_ranks_raw

TIMEOUT_S = 3


@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_failing_rank_raises_on_every_rank(mode):
    outcomes = run_ranks_raw(checks.fail_or_stall, 2, mode, 3 * TIMEOUT_S, limit_s=60, timeout_s=TIMEOUT_S)
    status0, value0 = outcomes[0]
    assert status0 == "ok", value0
    what, error, seconds = pickle.loads(value0)
    assert what == "raised", "the surviving rank must raise, not return"
    assert seconds < 6 * TIMEOUT_S, f"rank 0 took {seconds:.0f}s to notice"
    status1, value1 = outcomes[1]
    if mode == "raise":
        assert status1 == "error" and "injected failure" in value1
    else:  # the stalled rank wakes up to a dead group and raises too
        assert status1 == "ok" and pickle.loads(value1)[0] == "raised", value1


def test_failing_kernel_in_auto_calibration_names_it_and_stops_every_rank():
    """No rank hangs: the probe before calibration agrees on failure; the failing rank names kernel,
    configuration and device."""
    outcomes = run_ranks_raw(checks.failing_kernel_in_calibration, 2, limit_s=120, timeout_s=60)
    results = []
    for status, value in outcomes:
        assert status == "ok", value
        results.append(pickle.loads(value))
    (what0, type0, message0, seconds0), (what1, type1, message1, _) = results
    assert what0 == what1 == "raised" and type0 == type1 == "CalibrationError"
    assert "rank(s) [1]" in message0
    for piece in ("_expert_up_kernel", "BLOCK_M", "Triton interpreter", "OutOfResources", "shared memory"):
        assert piece in message1, (piece, message1)
    assert seconds0 < 60, "rank 0 must not wait for the collective timeout"

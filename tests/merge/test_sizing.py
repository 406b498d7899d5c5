"""Storage accounting: parameter-only and modulated methods, size parsing and state choice."""
from __future__ import annotations

import pytest

from merge import sizing
from merge.greedy import Step


def test_parameter_only_curve_counts_one_block_per_group():
    costs = [sizing.block_cost([(100, 4)], False, False), sizing.block_cost([(50, 2)], False, False)]
    steps = [Step(0, (0,), (1,), 0.9), Step(1, (0,), (2,), 0.8), Step(0, (0, 1), (2,), 0.5), Step(1, (0, 2), (1,), 0.1)]
    # 3 tasks: 3*400 + 3*100 = 1500, then one block copy less per step.
    assert sizing.curve(costs, steps, 3, modulated=False) == [1500, 1100, 1000, 600, 500]


def test_modulated_curve_counts_base_once_masks_as_bits_and_scales():
    cost = sizing.block_cost([(100, 2), (10, 2)], masks=True, scales=True)
    assert cost == sizing.BlockCost(220, 13 + 2, 8)
    steps = [Step(0, (0,), (1,), 0.9), Step(0, (0, 1), (2,), 0.5)]
    # 3 singletons: 660. Merge 2: base 220 + group (220 + 2*23) + singleton 220 = 706. All: 220 + 220 + 3*23 = 509.
    assert sizing.curve([cost], steps, 3, modulated=True) == [660, 706, 509]


@pytest.mark.parametrize(
    "text, expected",
    [("all", ("all", 0.0)), ("min", ("min", 0.0)), ("2.25", ("multiplier", 2.25)), ("3x", ("multiplier", 3.0)), (1, ("multiplier", 1.0)),
     ("800MB", ("bytes", 8e8)), ("1.5GiB", ("bytes", 1.5 * 1024**3)), ("1234B", ("bytes", 1234.0))],
)
def test_parse_size(text, expected):
    assert sizing.parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError, match="size must be"):
        sizing.parse_size("big")


def test_choose_state_takes_the_fewest_merges_that_fit():
    sizes = [660, 706, 509]
    assert sizing.choose_state(sizes, 700) == 0
    assert sizing.choose_state(sizes, 600) == 2
    with pytest.raises(ValueError, match="smallest reachable is 509"):
        sizing.choose_state(sizes, 500)

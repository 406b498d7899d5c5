"""The greedy merge order on cases whose order is known, and the streaming/global equivalence."""
from __future__ import annotations

import numpy as np
import pytest

from merge import greedy
from merge.greedy import Step


def test_order_is_global_across_blocks_and_uses_least_similar_members():
    b0 = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.8], [0.1, 0.8, 1.0]])
    b1 = np.array([[1.0, 0.5, 0.95], [0.5, 1.0, 0.6], [0.95, 0.6, 1.0]])
    steps = greedy.plan([b0, b1])
    assert steps == [
        Step(1, (0,), (2,), 0.95),
        Step(0, (0,), (1,), 0.9),
        # block 1: {0,2} vs {1}: min(0.5, 0.6) = 0.5; block 0: {0,1} vs {2}: min(0.1, 0.8) = 0.1
        Step(1, (0, 2), (1,), 0.5),
        Step(0, (0, 1), (2,), 0.1),
    ]


def test_complete_linkage_not_single_linkage():
    # Single linkage would next join 2 to {0,1} (sim 0.85 to 1); complete linkage prefers {2,3} (0.7 > 0.2).
    s = np.array([
        [1.0, 0.9, 0.2, 0.1],
        [0.9, 1.0, 0.85, 0.1],
        [0.2, 0.85, 1.0, 0.7],
        [0.1, 0.1, 0.7, 1.0],
    ])
    steps = greedy.plan([s])
    assert [(st.a, st.b) for st in steps] == [((0,), (1,)), ((2,), (3,)), ((0, 1), (2, 3))]
    assert steps[-1].score == pytest.approx(0.1)


def test_each_block_alone_gives_its_part_of_the_global_order():
    rng = np.random.default_rng(0)
    sims = []
    for _ in range(5):
        x = rng.normal(size=(7, 30))
        sims.append(greedy.similarity(x @ x.T, "cosine"))
    full = greedy.plan(sims)
    assert len(full) == 5 * 6
    assert [s.score for s in full] == sorted((s.score for s in full), reverse=True)
    for b, sim in enumerate(sims):
        alone = greedy.plan([sim])
        assert [(s.a, s.b) for s in full if s.block == b] == [(s.a, s.b) for s in alone]


def test_partitions_at_state():
    steps = greedy.plan([np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])])
    assert greedy.partitions_at(steps, 1, 3, 0) == [[(0,), (1,), (2,)]]
    assert greedy.partitions_at(steps, 1, 3, 1) == [[(0, 1), (2,)]]
    assert greedy.partitions_at(steps, 1, 3, 2) == [[(0, 1, 2)]]


def test_similarities_from_gram_match_direct_computation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 50))
    gram = x @ x.T
    cos = greedy.similarity(gram, "cosine")
    np.testing.assert_allclose(cos[0, 1], x[0] @ x[1] / np.linalg.norm(x[0]) / np.linalg.norm(x[1]))
    euc = greedy.similarity(gram, "euclidean")
    np.testing.assert_allclose(euc[2, 3], -np.linalg.norm(x[2] - x[3]))
    s = np.sign(x)
    sign = greedy.similarity(gram, "sign", s @ s.T, 50)
    np.testing.assert_allclose(sign[0, 2], np.mean(np.sign(x[0]) == np.sign(x[2])))
    with pytest.raises(ValueError, match="similarity must be one of"):
        greedy.similarity(gram, "manhattan")

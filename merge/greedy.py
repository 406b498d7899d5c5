"""The FlexMerge greedy order, computed from per-block Gram matrices only.

Every block keeps a partition of the tasks into groups (initially one group per task). A step merges,
over all blocks, the pair of groups whose least similar members are most similar (complete linkage).
Pair scores live in one heap; after a merge only the new group's pairs are pushed (their score is the
min of the two old scores, so nothing is recomputed from the weights) and stale entries are skipped when
popped. Because complete linkage never raises a score, each block's own merge sequence is the same
whether it is planned alone or together with the others — which lets the streaming `--size all` pass
build a block's group tree while that block is in memory and interleave the blocks afterwards.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

SIMILARITIES = ("cosine", "euclidean", "sign")


@dataclass(frozen=True)
class Step:
    block: int
    a: tuple[int, ...]
    b: tuple[int, ...]
    score: float

    @property
    def merged(self) -> tuple[int, ...]:
        return tuple(sorted(self.a + self.b))


def similarity(gram: np.ndarray, kind: str = "cosine", sign: np.ndarray | None = None, numel: int = 1) -> np.ndarray:
    """Pairwise task similarity in one block: cosine, negative RMS distance ‖τ_i − τ_j‖ / √numel, or sign
    agreement.

    `gram[i, j] = <τ_i, τ_j>` over the block; `sign[i, j] = Σ sign(τ_i) sign(τ_j)`, so the fraction of
    agreeing signs is (numel + sign) / (2 numel)."""
    gram = np.asarray(gram, dtype=np.float64)
    diag = np.clip(np.diag(gram), 0.0, None)
    if kind == "cosine":
        norms = np.sqrt(diag)
        denom = np.outer(norms, norms)
        sim = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
        zero = norms == 0
        sim[np.ix_(zero, zero)] = 1.0  # two untouched blocks are identical
        return sim
    if kind == "euclidean":
        # per entry (÷ √numel), so that blocks of different sizes compare on one scale
        return -np.sqrt(np.clip(diag[:, None] + diag[None, :] - 2 * gram, 0.0, None) / max(numel, 1))
    if kind == "sign":
        if sign is None:
            raise ValueError("sign similarity needs the sign-agreement matrix")
        return (numel + np.asarray(sign, dtype=np.float64)) / (2.0 * max(numel, 1))
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {kind!r}")


def plan(sims: list[np.ndarray]) -> list[Step]:
    """All merge steps in greedy order, from M groups per block down to one group per block."""
    heap = []
    link: list[dict[frozenset, float]] = []
    active: list[set[tuple[int, ...]]] = []
    for b, sim in enumerate(sims):
        m = sim.shape[0]
        groups = {(i,) for i in range(m)}
        scores = {}
        for i in range(m):
            for j in range(i + 1, m):
                s = float(sim[i, j])
                scores[frozenset([(i,), (j,)])] = s
                heap.append((-s, b, (i,), (j,)))
        link.append(scores)
        active.append(groups)
    heapq.heapify(heap)
    steps = []
    while heap:
        neg, b, a, c = heapq.heappop(heap)
        if a not in active[b] or c not in active[b]:
            continue
        step = Step(b, a, c, -neg)
        steps.append(step)
        new = step.merged
        active[b] -= {a, c}
        for other in active[b]:
            s = min(link[b][frozenset([a, other])], link[b][frozenset([c, other])])
            link[b][frozenset([new, other])] = s
            first, second = sorted([new, other])
            heapq.heappush(heap, (-s, b, first, second))
        active[b].add(new)
    return steps


def partitions_at(steps: list[Step], n_blocks: int, n_tasks: int, state: int) -> list[list[tuple[int, ...]]]:
    """The groups of every block after the first `state` steps (sorted, deterministic)."""
    parts = [{(i,) for i in range(n_tasks)} for _ in range(n_blocks)]
    for step in steps[:state]:
        parts[step.block] -= {step.a, step.b}
        parts[step.block].add(step.merged)
    return [sorted(p) for p in parts]

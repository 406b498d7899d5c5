"""The streaming `size: all` pass: the batched linear tree computes the same blocks as per-group merging."""
from __future__ import annotations

import pytest
import torch
from merge_helpers import make_family

from merge import greedy
from merge.config import load_spec
from merge.flexmerge import Session, _merge_tree_linear


@pytest.mark.parametrize("method, params, weights", [
    ("task_arithmetic", {"lambda": 0.4}, {}),
    ("task_arithmetic", {}, {}),
    ("average", {}, {"b": 2.0, "d": 0.5}),
])
def test_linear_tree_equals_per_group_merge(tmp_path, method, params, weights):
    base, models = make_family(tmp_path, "clip", tasks=("a", "b", "c", "d", "e"))
    entries = {t: {"path": str(p), "weight": weights.get(t, 1.0)} for t, p in models.items()}
    session = Session(load_spec(None, {"base": str(base), "models": entries, "method": method, "params": params}))
    checked = []

    def on_block(b, block, base_t, tvs, stats):
        steps = greedy.plan([greedy.similarity(stats.grams[b])])
        collected = {}
        errors = _merge_tree_linear(session, block, steps, tvs, stats.grams[b], chunk=100, collect=collected)
        for step in steps:
            ref = session.merge_group(block, step.merged, session.prepare_block(block, tvs, None))
            for n in ref.vector:
                got = torch.cat(collected[(step.merged, n)]).view_as(ref.vector[n])
                torch.testing.assert_close(got, ref.vector[n], rtol=1e-5, atol=1e-7)
            for pos, k in enumerate(step.merged):
                direct = sum(float((ref.vector[n] - tvs[n][k]).pow(2).sum()) for n in ref.vector)
                assert errors[step.merged][pos] == pytest.approx(direct, rel=1e-4, abs=1e-9)
        checked.append(block.name)

    session.scan(on_block=on_block)
    assert len(checked) == len(session.blocks)


def test_preparing_all_tasks_once_equals_preparing_each_group(tmp_path):
    """Trimming and DARE drops are per task, so a group's rows of the block-wide preparation are the
    group's own preparation: the basis of computing them once per block."""
    from merge import methods

    base, models = make_family(tmp_path, "bert", tasks=("a", "b", "c", "d"))
    for method, params in (("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5}), ("emr", {"dare": 0.7}),
                           ("tsv_m", {})):
        session = Session(load_spec(None, {"base": str(base), "models": {k: str(v) for k, v in models.items()},
                                           "method": method, "params": params}))

        def on_block(b, block, base_t, tvs, stats):
            prepared = session.prepare_block(block, tvs, None)
            for group in ((0, 2), (1, 2, 3)):
                index = torch.tensor(group)
                own = methods.apply(session.method, {n: t.index_select(0, index) for n, t in tvs.items()},
                                    session.context(block, group))
                via_block = session.merge_group(block, group, prepared)
                for n in own.vector:
                    torch.testing.assert_close(via_block.vector[n], own.vector[n])

        session.scan(on_block=on_block)


def test_tie_break_defaults_to_mergekits_for_a_size_and_to_index_for_the_curve(tmp_path):
    """Unset, `tie_break` is mergekit's (exact parity) for a fixed size and the lean index rule for the size
    curve; a value the user gives is kept either way."""
    base, models = make_family(tmp_path, "clip", tasks=("a", "b", "c"))
    cfg = {"base": str(base), "models": {k: str(v) for k, v in models.items()}, "method": "ties", "params": {"density": 0.5}}
    assert Session(load_spec(None, {**cfg, "size": 1})).params["tie_break"] == "mergekit"
    assert Session(load_spec(None, {**cfg, "size": "all"})).params["tie_break"] == "index"
    chosen = {**cfg, "size": "all", "params": {"density": 0.5, "tie_break": "mergekit"}}
    assert Session(load_spec(None, chosen)).params["tie_break"] == "mergekit"

"""`out` can never destroy an input, and the size plan never takes a state that is not smaller."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from merge_helpers import make_family, spec

from merge import greedy, sizing
from merge.artifact import export
from merge.flexmerge import run


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_out_holding_the_inputs_is_refused_even_with_overwrite(tmp_path):
    # The reproduction from issue 11: out = the folder with the base and the task models, --overwrite.
    base, models = make_family(tmp_path / "ckpts", "bert")
    before = snapshot(tmp_path / "ckpts")
    for out in (tmp_path / "ckpts", models["a"], models["a"] / "merged", tmp_path):
        with pytest.raises(ValueError, match="writing there could destroy it"):
            run(spec(base, models, out, overwrite=True, size=1))
    assert snapshot(tmp_path / "ckpts") == before


def test_out_check_comes_before_any_read(tmp_path, monkeypatch):
    base, models = make_family(tmp_path, "bert")
    import merge.flexmerge as fm

    monkeypatch.setattr(fm, "Checkpoint", lambda *a, **k: pytest.fail("an input was opened before the out check"))
    with pytest.raises(ValueError, match="is the input"):
        run(spec(base, models, base, overwrite=True))


def test_symlinked_out_pointing_at_an_input_is_refused(tmp_path):
    base, models = make_family(tmp_path, "bert")
    link = tmp_path / "link"
    link.symlink_to(models["b"], target_is_directory=True)
    with pytest.raises(ValueError, match="writing there could destroy it"):
        run(spec(base, models, link, overwrite=True))
    assert (models["b"] / "model.safetensors").exists()


def test_export_never_overwrites_its_artifact(tmp_path):
    base, models = make_family(tmp_path, "bert")
    run(spec(base, models, tmp_path / "art", size=2))
    with pytest.raises(ValueError, match="writing there could destroy it"):
        export(tmp_path / "art", "a", tmp_path / "art", overwrite=True)
    assert (tmp_path / "art" / "manifest.json").exists()


def _steps_and_costs(M, n_blocks, numel, elem):
    rng = np.random.default_rng(0)
    sims = []
    for _ in range(n_blocks):
        s = rng.uniform(0, 1, (M, M))
        sims.append((s + s.T) / 2)
    steps = greedy.plan(sims)
    costs = [sizing.block_cost([(numel, elem)], masks=True, scales=True) for _ in range(n_blocks)]
    return steps, costs


@pytest.mark.parametrize("M", [2, 3, 5])
def test_modulated_plan_only_takes_states_smaller_than_the_one_they_replace(M):
    steps, costs = _steps_and_costs(M, 4, 4096, 2)  # bf16: a mask is 1/16 of the block
    ordered = sizing.byte_ordered(steps, costs, M, modulated=True)
    sizes = sizing.curve(costs, ordered, M, modulated=True)
    # states where the plan can stop (after each block's multi-step merge) strictly shrink
    boundaries = [0] + [i for i in range(1, len(sizes)) if sizes[i] < min(sizes[:i])]
    assert all(sizes[b] < sizes[a] for a, b in zip(boundaries, boundaries[1:]))
    assert sizes[-1] == min(sizes)  # the last state is the smallest: `size: min` is never worse
    if M == 2:
        assert ordered == []  # a merged pair (vector + base + masks) never beats two fine-tuned copies
    for b in range(4):  # each block keeps a prefix of its own merge order
        own = [s for s in steps if s.block == b]
        taken = [s for s in ordered if s.block == b]
        assert taken == own[: len(taken)]
    for budget in sizes:
        state = sizing.choose_state(sizes, budget)
        assert all(sizes[state] < sizes[s] for s in range(state))


def test_parameter_only_plans_are_unchanged():
    steps, costs = _steps_and_costs(4, 3, 100, 4)
    assert sizing.byte_ordered(steps, costs, 4, modulated=False) == steps


def test_euclidean_similarity_is_per_entry():
    # the same per-entry difference in a block 100x larger gives the same score
    small = np.array([[1.0, 0.0], [0.0, 4.0]])  # ||τ_0 − τ_1||² = 5 over 5 entries
    big = small * 100
    s_small = greedy.similarity(small, "euclidean", numel=5)
    s_big = greedy.similarity(big, "euclidean", numel=500)
    np.testing.assert_allclose(s_small, s_big)
    np.testing.assert_allclose(s_small[0, 1], -1.0)


def test_global_scope_threshold_error_is_bounded():
    """scope: global keeps every entry at or above the exact k-th largest magnitude, plus only entries
    within one bf16 step (relative 2^-7) below it."""
    from merge.sparsify import magnitude_histogram, threshold_from_histogram

    g = torch.Generator().manual_seed(5)
    parts = [torch.randn(3, 5000, generator=g) * s for s in (0.01, 1.0, 30.0)]
    full = torch.cat(parts, 1).abs()
    thr = threshold_from_histogram(sum(magnitude_histogram(p) for p in parts), 0.05)
    k = int(0.05 * full.shape[1])
    for t in range(3):
        exact = full[t].topk(k).values[-1]
        kept = full[t][full[t] >= thr[t]]
        assert bool((full[t] >= exact).sum() <= kept.numel())  # nothing of the exact top-k is lost
        assert float(kept.min()) >= float(exact) * (1 - 2**-7)  # extras lie within one bf16 step below

"""mergekit's methods, each against a re-derivation from its paper written here, plus mergekit's defaults."""
from __future__ import annotations

import math

import pytest
import torch

from merge import methods
from merge_helpers import argsort_trim, run, shared_rng

# Read from mergekit's merge_methods/registry.py and sparsify.py: the defaults a mergekit user relies on.
MERGEKIT_DEFAULTS = {
    "task_arithmetic": {"lambda": 1.0, "normalize": False},
    "ties": {"density": 1.0, "lambda": 1.0, "normalize": True},
    "dare_ties": {"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": True},
    "dare_linear": {"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": True},
    "breadcrumbs": {"density": 1.0, "gamma": 0.01, "lambda": 1.0, "normalize": False, "rescale": False},
    "breadcrumbs_ties": {"density": 1.0, "gamma": 0.01, "lambda": 1.0, "normalize": False, "rescale": False},
    "della": {"density": 1.0, "epsilon": 0.15, "lambda": 1.0, "normalize": True, "rescale": True},
    "della_linear": {"density": 1.0, "epsilon": 0.15, "lambda": 1.0, "normalize": False, "rescale": True},
    "linear": {"normalize": True},
    "model_stock": {"filter_wise": False},
    "slerp": {"t": None},
    "nuslerp": {"nuslerp_flatten": True, "nuslerp_row_wise": False},
    "passthrough": {"scale": None},
}


@pytest.fixture
def tvs():
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(3, 10, 12, generator=g), "b": torch.randn(3, 120, generator=g)}


@pytest.mark.parametrize("name", sorted(MERGEKIT_DEFAULTS))
def test_mergekit_names_and_defaults(name):
    resolved = methods.resolve_params(methods.get(name), {})
    for key, value in MERGEKIT_DEFAULTS[name].items():
        assert resolved[key] == value, (name, key)


def test_gta_methods_accept_mergekit_global_parameters():
    for name in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        methods.resolve_params(methods.get(name), {"int8_mask": True, "normalize": True, "lambda": 0.5})


def test_dare_rescale_keeps_the_l1_norm_as_mergekit_does(tvs):
    t = tvs["b"]
    g = torch.Generator().manual_seed(9)
    ref = []
    for k in range(3):
        keep = torch.bernoulli(torch.full(t[k].shape, 0.4), generator=g)
        kept = t[k] * keep
        ref.append(kept * t[k].abs().sum() / kept.abs().sum())
    out = run("dare_linear", {"b": t}, [1.0, 2.0, 0.5], rng=shared_rng(9), density=0.4).vector["b"]
    torch.testing.assert_close(out, ref[0] + 2 * ref[1] + 0.5 * ref[2])


def test_breadcrumbs_drops_outliers_and_the_smallest(tvs):
    t = tvs["b"]  # 120 entries: density 0.5 keeps 60, gamma 0.05 drops the top 6, so ranks 54..113 from the bottom
    ref = []
    for k in range(3):
        order = sorted(range(120), key=lambda i: abs(float(t[k, i])))
        kept = set(order[54:114])
        ref.append(torch.tensor([float(t[k, i]) if i in kept else 0.0 for i in range(120)]))
    out = run("breadcrumbs", {"b": t}, density=0.5, gamma=0.05).vector["b"]
    torch.testing.assert_close(out, ref[0] + ref[1] + ref[2])
    ties = run("breadcrumbs_ties", {"b": t}, density=0.5, gamma=0.05).vector["b"]
    stacked = torch.stack(ref)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == sign
    torch.testing.assert_close(ties, (stacked * agree).sum(0))  # normalize false: a sum of the agreeing entries


def test_della_keep_probabilities_rise_linearly_with_rank():
    from merge.sparsify import della_keep_probabilities

    x = torch.tensor([[0.1, -3.0, 2.0, 0.5, -1.0]])
    p = della_keep_probabilities(x, 0.5, 0.1)
    # ranks by magnitude 0..4 -> 0.4 + rank/4 * 0.2
    torch.testing.assert_close(p, torch.tensor([[0.4, 0.6, 0.55, 0.45, 0.5]]))
    with pytest.raises(ValueError, match="density ± epsilon"):
        della_keep_probabilities(x, 0.9, 0.15)


def test_della_is_magprune_then_ties(tvs):
    t = tvs["w"]
    from merge.sparsify import della_keep_probabilities

    g = torch.Generator().manual_seed(1)
    rows = []
    for k in range(3):
        keep = torch.bernoulli(della_keep_probabilities(t[k], 0.5, 0.2), generator=g)
        kept = t[k] * keep
        rows.append(kept * t[k].abs().sum() / kept.abs().sum())
    stacked = torch.stack(rows)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == sign).float()
    ref = (stacked * agree).sum(0) / torch.where(agree.sum(0) == 0, 1.0, agree.sum(0))
    out = run("della", {"w": t}, rng=shared_rng(1), density=0.5, epsilon=0.2).vector["w"]
    torch.testing.assert_close(out, ref)


def test_model_stock_ratio_from_the_angle():
    # two task vectors at 60 degrees: cos = 0.5, t = 2 * 0.5 / (1 + 0.5) = 2/3
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.5, math.sqrt(3) / 2])
    out = run("model_stock", {"x": torch.stack([a, b])}).vector["x"]
    torch.testing.assert_close(out, 2 / 3 * (a + b) / 2)
    # filter-wise: one angle per row
    m = torch.stack([torch.stack([a, a]), torch.stack([b, a])])
    rows = run("model_stock", {"m": m}, filter_wise=True).vector["m"]
    torch.testing.assert_close(rows[0], 2 / 3 * (a + b) / 2)
    torch.testing.assert_close(rows[1], a)  # identical rows: cos 1, t 1


def test_slerp_follows_the_great_circle():
    base = {"x": torch.zeros(2)}
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    out = run("slerp", {"x": torch.stack([a, b])}, base=base, t=1 / 3).vector["x"]
    # Ω = 90°: sin(60°) a + sin(30°) b
    torch.testing.assert_close(out, math.sin(math.pi / 3) * a + math.sin(math.pi / 6) * b)
    near = torch.stack([a, a * 1.5])  # colinear: linear interpolation
    torch.testing.assert_close(run("slerp", {"x": near}, base=base, t=0.5).vector["x"], 1.25 * a)
    with pytest.raises(ValueError, match="needs the interpolation parameter"):
        run("slerp", {"x": near}, base=base)
    with pytest.raises(ValueError, match="exactly two"):
        run("slerp", {"x": torch.stack([a, b, a])}, base=base, t=0.5)


def test_slerp_interpolates_the_models_not_the_task_vectors():
    base = {"x": torch.tensor([3.0, -1.0])}
    a, b = torch.tensor([1.0, 0.5]), torch.tensor([-0.5, 2.0])
    t = 0.3
    wa, wb = base["x"] + a, base["x"] + b
    omega = math.acos(float(wa @ wb / (wa.norm() * wb.norm())))
    ref = (math.sin((1 - t) * omega) * wa + math.sin(t * omega) * wb) / math.sin(omega)
    out = run("slerp", {"x": torch.stack([a, b])}, base=base, t=t).vector["x"]
    torch.testing.assert_close(base["x"] + out, ref)


def test_nuslerp_weights_set_t_and_rows_can_have_their_own_angle():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = run("nuslerp", {"x": torch.stack([a, b])}, [1.0, 1.0], nuslerp_flatten=False).vector["x"]
    h = math.sin(math.pi / 4) / math.sin(math.pi / 2)
    torch.testing.assert_close(out[0], h * torch.tensor([1.0, 1.0]))  # t = 0.5 at 90 degrees
    torch.testing.assert_close(out[1], torch.tensor([1.0, 0.0]))  # colinear row: lerp
    flat = run("nuslerp", {"x": torch.stack([a, b])}, [3.0, 1.0]).vector["x"]  # t = 1/4, one angle
    av, bv = a.reshape(-1), b.reshape(-1)
    omega = math.acos(float(av @ bv / (av.norm() * bv.norm())))
    ref = (math.sin(0.75 * omega) * av + math.sin(0.25 * omega) * bv) / math.sin(omega)
    torch.testing.assert_close(flat.reshape(-1), ref)


def test_passthrough_scales_one_model():
    base = {"x": torch.tensor([1.0, 2.0])}
    tv = torch.tensor([[0.5, -1.0]])
    torch.testing.assert_close(run("passthrough", {"x": tv}, base=base).vector["x"], tv[0])
    scaled = run("passthrough", {"x": tv}, base=base, task_params={"scale": [2.0]}).vector["x"]
    torch.testing.assert_close(base["x"] + scaled, 2 * (base["x"] + tv[0]))


def test_linear_without_normalize_is_the_weighted_sum_of_models():
    base = {"x": torch.tensor([1.0, -2.0])}
    tv = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    out = run("linear", {"x": tv}, [0.5, 2.0], base=base, normalize=False).vector["x"]
    torch.testing.assert_close(base["x"] + out, 0.5 * (base["x"] + tv[0]) + 2.0 * (base["x"] + tv[1]))


def test_per_model_density_trims_each_task_to_its_own(tvs):
    t = tvs["b"]
    out = run("ties", {"b": t}, task_params={"density": [0.1, 0.5, 1.0]}).vector["b"]
    trimmed = torch.stack([argsort_trim(t[0], 0.1), argsort_trim(t[1], 0.5), t[2]])
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = (trimmed.sign() == sign).float()
    torch.testing.assert_close(out, (trimmed * agree).sum(0) / torch.where(agree.sum(0) == 0, 1.0, agree.sum(0)))

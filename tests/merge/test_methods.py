"""Every algorithm on small tensors, against PEFT's merge_utils or hand-computed results."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft.utils import merge_utils as peft

from merge import methods
from merge_helpers import argsort_trim, run, shared_rng
from merge.methods import Context, MergeResult, apply
from merge.sparsify import magnitude_histogram, threshold_from_histogram, trim


@pytest.fixture
def tvs():
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(3, 6, 5, generator=g), "b": torch.randn(3, 7, generator=g)}


def test_task_arithmetic_matches_peft_and_paper(tvs):
    w = [0.5, 1.0, 2.0]
    out = run("task_arithmetic", tvs, w, **{"lambda": 0.3})
    for n, t in tvs.items():
        ref = peft.task_arithmetic(list(t), torch.tensor(w))
        torch.testing.assert_close(out.vector[n], 0.3 * ref)
        torch.testing.assert_close(out.vector[n], 0.3 * (0.5 * t[0] + t[1] + 2 * t[2]))


def test_average_and_linear_are_the_weighted_mean(tvs):
    for name in ("average", "linear"):
        out = run(name, tvs, [1.0, 1.0, 2.0])
        torch.testing.assert_close(out.vector["w"], (tvs["w"][0] + tvs["w"][1] + 2 * tvs["w"][2]) / 4)


@pytest.mark.parametrize("density", [0.3, 0.5])
def test_ties_matches_peft(tvs, density):
    out = run("ties", tvs, density=density)
    for n, t in tvs.items():
        torch.testing.assert_close(out.vector[n], peft.ties(list(t), torch.ones(3), density))


def test_ties_by_hand():
    # Trim at density 2/3 keeps two entries per task; signs: +, -, + elected by the totals.
    t = torch.tensor([[3.0, -1.0, 0.5], [2.0, 2.0, -4.0], [-1.0, -3.0, 1.0]])
    out = run("ties", {"x": t}, density=2 / 3, **{"lambda": 2.0})
    # trimmed: [3,-1,0], [2,0,-4], [0,-3,1]; totals 5,-4,-3 -> signs +,-,-
    # entry 0: mean(3,2)=2.5; entry 1: mean(-1,-3)=-2; entry 2: -4 alone
    torch.testing.assert_close(out.vector["x"], 2.0 * torch.tensor([2.5, -2.0, -4.0]))


def test_magnitude_prune_matches_peft(tvs):
    w = [1.0, 0.5, 2.0]
    out = run("magnitude_prune", tvs, w, density=0.4)
    for n, t in tvs.items():
        torch.testing.assert_close(out.vector[n], peft.magnitude_prune(list(t), torch.tensor(w), 0.4))


def test_dare_linear_matches_peft(tvs):
    w = [1.0, 0.5, 2.0]
    for n, t in tvs.items():
        torch.manual_seed(11)
        ref = peft.dare_linear(list(t), torch.tensor(w), 0.6)
        out = run("dare_linear", {n: t}, w, rng=shared_rng(11), density=0.6, rescale="density")
        torch.testing.assert_close(out.vector[n], ref)


def test_dare_ties_matches_peft(tvs):
    for n, t in tvs.items():
        torch.manual_seed(5)
        ref = peft.dare_ties(list(t), torch.ones(3), 0.5)
        out = run("dare_ties", {n: t}, rng=shared_rng(5), density=0.5, rescale="density", normalize=True)
        torch.testing.assert_close(out.vector[n], ref)


def test_dare_preprocessing_composes_with_any_method(tvs):
    t = tvs["w"]
    g = torch.Generator().manual_seed(2)
    dropped = torch.stack([t[k] * torch.bernoulli(torch.full_like(t[k], 0.5), generator=g) / 0.5 for k in range(3)])
    out = run("iso_c", {"w": t}, rng=shared_rng(2), dare=0.5)
    ref = run("iso_c", {"w": dropped})
    torch.testing.assert_close(out.vector["w"], ref.vector["w"])


def test_trim_scopes():
    t = {"a": torch.tensor([[1.0, -5.0], [2.0, 1.0]]), "b": torch.tensor([[4.0, 0.5], [-3.0, 0.1]])}
    per_tensor = trim(t, 0.5, "tensor", None)
    assert per_tensor["a"].tolist() == [[0.0, -5.0], [2.0, 0.0]]
    assert per_tensor["b"].tolist() == [[4.0, 0.0], [-3.0, 0.0]]
    per_block = trim(t, 0.5, "block", None)  # top 2 of 4 per task over the block
    assert per_block["a"].tolist() == [[0.0, -5.0], [2.0, 0.0]]
    assert per_block["b"].tolist() == [[4.0, 0.0], [-3.0, 0.0]]
    thresholds = torch.tensor([4.0, 2.0])
    glob = trim(t, 0.5, "global", thresholds)
    assert glob["a"].tolist() == [[0.0, -5.0], [2.0, 0.0]]
    assert glob["b"].tolist() == [[4.0, 0.0], [-3.0, 0.0]]


def test_global_threshold_from_streamed_histograms_keeps_the_top_fraction():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 1000, generator=g), torch.randn(2, 3000, generator=g) * 3]
    hist = sum(magnitude_histogram(p) for p in parts)
    thr = threshold_from_histogram(hist, 0.1)
    full = torch.cat(parts, dim=1).abs()
    for k in range(2):
        kept = int((full[k] >= thr[k]).sum())
        exact = full[k].topk(400).values[-1]
        assert 400 <= kept <= 420  # the top 10%, plus at most the rest of one bf16-wide bucket
        assert thr[k] <= exact and exact - thr[k] <= exact * 2**-7


def _pcb_reference(t, ratio):
    """PCB from the paper's equations (Du et al. 2024, eqs. 2-5), entry by entry in plain Python loops."""
    K, n = t.shape
    rows = t.tolist()

    def norm(v):
        lo, hi = min(v), max(v)
        return [(x - lo) / (hi - lo) for x in v]

    def softmax(v):
        e = [math.exp(x - max(v)) for x in v]
        return [x / sum(e) for x in e]

    beta = []
    for i in range(K):
        intra = softmax([K * x for x in norm([a * a for a in rows[i]])])
        inter = [0.0] * n
        for j in range(K):
            s = softmax(norm([a * b for a, b in zip(rows[i], rows[j])]))
            inter = [x + y for x, y in zip(inter, s)]
        beta.append([a * b for a, b in zip(intra, inter)])
    keep = int(ratio * n)
    kept = []
    for i in range(K):
        cut = sorted(beta[i], reverse=True)[keep - 1]
        kept.append([b if b >= cut else 0.0 for b in beta[i]])
    return torch.tensor([sum(kept[i][e] * rows[i][e] for i in range(K)) / max(sum(kept[i][e] for i in range(K)), 1e-300)
                         for e in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_pcb_against_paper_equations(scale):
    g = torch.Generator().manual_seed(1)
    t = scale * torch.randn(4, 24, generator=g, dtype=torch.float64)
    out = run("pcb", {"x": t.float()}, ratio=0.25, scope="tensor", **{"lambda": 0.5}).vector["x"]
    torch.testing.assert_close(out.double(), 0.5 * _pcb_reference(t, 0.25), rtol=1e-5, atol=1e-7 * scale)


def test_pcb_is_not_magnitude_weighting_on_fine_tuning_sized_deltas():
    # Deltas of ~1e-3 (products ~1e-6): without normalisation the inter-task softmax would be uniform.
    g = torch.Generator().manual_seed(4)
    t = 1e-3 * torch.randn(4, 200, generator=g)
    t[1] = -t[0] + 1e-4 * torch.randn(200, generator=g)  # task 1 conflicts with task 0 everywhere
    from merge.methods.pcb import pcb_scores

    beta = pcb_scores(t.double())
    sq = (t * t).double()
    intra_only = torch.softmax(4 * (sq - sq.min(1, keepdim=True).values) / (sq.max(1, keepdim=True).values - sq.min(1, keepdim=True).values), dim=1)
    inter = beta / intra_only
    assert float((inter.std(1) / inter.mean(1)).min()) > 0.02  # the inter-task factor is not uniform
    assert not torch.allclose(run("pcb", {"x": t}, ratio=0.3).vector["x"], run("magnitude_prune", {"x": t}, density=0.3).vector["x"] / 4)


def test_tall_masks_and_consensus_by_hand():
    t = torch.tensor([[1.0, 0.1, -1.0, 0.0], [1.0, -0.1, 0.1, 0.0], [0.0, 2.0, 0.1, 0.0]])
    # mtl = [2, 2, -0.8, 0]; |τ_k| >= 0.5 |mtl - τ_k|
    res = run("tall_masks", {"x": t}, tall_lambda=0.5)
    assert res.masks["x"].tolist() == [
        [True, False, True, True],
        [True, False, False, True],
        [False, True, False, True],
    ]
    torch.testing.assert_close(res.vector["x"], torch.tensor([2.0, 2.0, -0.8, 0.0]))
    torch.testing.assert_close(res.task_vector(0, "x"), torch.tensor([2.0, 0.0, -0.8, 0.0]))
    cons = run("consensus", {"x": t}, tall_lambda=0.5, k=2, **{"lambda": 0.5})
    torch.testing.assert_close(cons.vector["x"], 0.5 * torch.tensor([2.0, 0.0, 0.0, 0.0]))


def test_emr_by_hand():
    t = torch.tensor([[2.0, -1.0, 1.0], [1.0, 3.0, -2.0]])
    res = run("emr", {"x": t})
    # sums 3, 2, -1 -> signs +, +, -; magnitudes: max agreeing |τ|: 2, 3, 2
    torch.testing.assert_close(res.vector["x"], torch.tensor([2.0, 3.0, -2.0]))
    assert res.masks["x"].tolist() == [[True, False, False], [True, True, True]]
    # λ_1 = (2+1+1) / 2 = 2; λ_2 = (1+3+2) / (2+3+2) = 6/7
    torch.testing.assert_close(res.scales["x"], torch.tensor([2.0, 6 / 7]))
    torch.testing.assert_close(res.task_vector(0, "x"), torch.tensor([4.0, 0.0, 0.0]))


def test_tsv_m_keeps_orthogonal_tasks_and_averages_vectors():
    e = torch.eye(4)
    t1, t2 = 3 * torch.outer(e[0], e[1]), 2 * torch.outer(e[2], e[3])
    res = run("tsv_m", {"w": torch.stack([t1, t2]), "b": torch.tensor([[1.0, 2.0], [3.0, 6.0]])}, sv_reduction=0.25)
    torch.testing.assert_close(res.vector["w"], t1 + t2)
    torch.testing.assert_close(res.vector["b"], torch.tensor([2.0, 4.0]))


def test_tsv_m_orthogonalises_interfering_tasks():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 6, 6, generator=g)
    out = run("tsv_m", {"w": t}, sv_reduction=0.5).vector["w"]
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    U = torch.cat([u[0, :, :3], u[1, :, :3]], 1)
    V = torch.cat([vh[0, :3].T, vh[1, :3].T], 1)
    S = torch.cat([s[0, :3], s[1, :3]])
    p, _, q = torch.linalg.svd(U)
    pv, _, qv = torch.linalg.svd(V)
    torch.testing.assert_close(out, (p @ q) @ torch.diag(S) @ (pv @ qv).T, atol=1e-5, rtol=1e-5)


def test_iso_c_flattens_the_spectrum_and_averages_vectors():
    m = torch.diag(torch.tensor([3.0, 1.0]))
    res = run("iso_c", {"w": torch.stack([m, torch.zeros(2, 2)]), "b": torch.tensor([[1.0], [2.0]])}, **{"lambda": 0.5})
    torch.testing.assert_close(res.vector["w"], 0.5 * 2.0 * torch.eye(2))
    torch.testing.assert_close(res.vector["b"], 0.5 * torch.tensor([1.5]))  # λ · mean, not λ · sum


def test_iso_c_can_leave_token_embeddings_out_of_the_svd():
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(3, 8, 4, generator=g), "model.layers.0.q.weight": torch.randn(3, 4, 4, generator=g)}
    res = run("iso_c", t, exclude_embeddings=True)
    torch.testing.assert_close(res.vector["model.embed_tokens.weight"], t["model.embed_tokens.weight"].mean(0))
    u, s, vh = torch.linalg.svd(t["model.layers.0.q.weight"].sum(0))
    torch.testing.assert_close(res.vector["model.layers.0.q.weight"], s.mean() * u @ vh, atol=1e-5, rtol=1e-5)


def _iso_cts_reference(w, fraction):
    """Iso-CTS as the paper's Algorithm 2 states it, with numpy."""
    w = w.double().numpy()
    K, r = w.shape[0], min(w.shape[1:])
    k = int(r * fraction)
    s_per = round((r - k) / K)
    k = r - s_per * K
    U, S, Vt = np.linalg.svd(w.sum(0), full_matrices=False)
    Uc, Sc, Vc = U[:, :k], S[:k], Vt[:k]
    cols_u, vals, rows_v = [Uc], [Sc], [Vc]
    for t in range(K):
        resid = (np.eye(w.shape[1]) - Uc @ Uc.T) @ w[t]
        Ut, St, Vtt = np.linalg.svd(resid, full_matrices=False)
        cols_u.append(Ut[:, :s_per]); vals.append(St[:s_per]); rows_v.append(Vtt[:s_per])
    Ucat, Scat, Vcat = np.concatenate(cols_u, 1), np.concatenate(vals), np.concatenate(rows_v, 0)
    P, _, Q = np.linalg.svd(Ucat, full_matrices=False)
    P2, _, Q2 = np.linalg.svd(Vcat.T, full_matrices=False)
    return torch.from_numpy(Scat.mean() * (P @ Q) @ (P2 @ Q2).T)


def test_iso_cts_matches_the_papers_algorithm():
    g = torch.Generator().manual_seed(7)
    t = {"w": torch.randn(3, 12, 10, generator=g), "b": torch.randn(3, 5, generator=g)}
    res = run("iso_cts", t, common_space_fraction=0.4, **{"lambda": 0.7})
    torch.testing.assert_close(res.vector["w"].double(), 0.7 * _iso_cts_reference(t["w"], 0.4), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.vector["b"], 0.7 * t["b"].mean(0))
    # with the whole spectrum common, Iso-CTS is Iso-C
    torch.testing.assert_close(run("iso_cts", t, common_space_fraction=1.0).vector["w"], run("iso_c", t).vector["w"], atol=1e-4, rtol=1e-4)


def test_registry_errors_and_new_method_is_one_registration(tvs):
    with pytest.raises(KeyError, match="unknown merge method 'nope'"):
        methods.get("nope")
    with pytest.raises(ValueError, match="no parameter"):
        methods.resolve_params(methods.get("ties"), {"densty": 0.2})

    @methods.register("first_task_for_test")
    def first(tvs, ctx):
        return MergeResult({n: t[0] for n, t in tvs.items()})

    try:
        assert "first_task_for_test" in methods.available()
        torch.testing.assert_close(run("first_task_for_test", tvs).vector["w"], tvs["w"][0])
    finally:
        methods._REGISTRY.pop("first_task_for_test")


def test_every_registered_method_runs_on_a_block(tvs):
    names = {"average", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "magnitude_prune",
             "pcb", "tall_masks", "consensus", "emr", "tsv_m", "iso_c", "iso_cts", "breadcrumbs", "breadcrumbs_ties",
             "della", "della_linear", "model_stock", "slerp", "nuslerp", "passthrough"}
    assert names == set(methods.available())
    base = {n: torch.randn(t.shape[1:]) for n, t in tvs.items()}
    for name in names:
        group = {n: t[:1] for n, t in tvs.items()} if name == "passthrough" else (
            {n: t[:2] for n, t in tvs.items()} if name in ("slerp", "nuslerp") else tvs)
        method = methods.get(name)
        K = next(iter(group.values())).shape[0]
        params = {"t": 0.5} if name == "slerp" else {}
        ctx = Context(methods.resolve_params(method, params), torch.ones(K), None, shared_rng(0), base=base)
        res = apply(method, group, ctx)
        for n, t in tvs.items():
            assert res.vector[n].shape == t.shape[1:] and torch.isfinite(res.vector[n]).all(), name


@pytest.mark.parametrize("name, params", [("task_arithmetic", {"lambda": 0.7}), ("task_arithmetic", {"normalize": True}),
                                          ("average", {}), ("linear", {})])
def test_linear_coefficients_agree_with_the_method(tvs, name, params):
    method = methods.get(name)
    ctx = Context(methods.resolve_params(method, params), torch.tensor([1.0, 0.5, 2.0]))
    c = method.coefficients(ctx)
    torch.testing.assert_close(method.fn(tvs, ctx).vector["w"], torch.einsum("k,kij->ij", c, tvs["w"]))


def test_magnitude_trim_keeps_exactly_k_even_with_ties():
    from merge.sparsify import magnitude_trim_

    x = torch.tensor([1.0, -3.0, 2.0, 2.0, 2.0, 0.5])
    kept = magnitude_trim_(x.clone(), 0.5) != 0  # k = 3: -3 and two of the three 2s
    assert int(kept.sum()) == 3 and kept[1] and not kept[0] and not kept[5]


@pytest.mark.parametrize("n", [1000, 70_001, 300_000])
def test_trims_equal_argsort_on_bf16_ties(n):
    """bf16 task vectors are full of equal magnitudes. torch's CPU argsort is std::sort, not stable (ties
    come out in a data-dependent order), so the in-place sort must keep exactly the entries argsort keeps:
    for the top-k (TIES) and for Model Breadcrumbs' two cuts, ascending as mergekit sorts there."""
    from merge.sparsify import magnitude_trim_, outliers_trim_

    x = ((torch.randn(n, generator=torch.Generator().manual_seed(n)) * 8).round() / 8).to(torch.bfloat16).float()
    stable = torch.sort(x.abs(), descending=True, stable=True).indices
    assert not torch.equal(torch.argsort(x.abs(), descending=True), stable)  # the tie order is not the index order
    for density in (0.1, 0.5, 0.9):
        k = int(density * n)
        assert (x.abs() == x.abs()[stable[k - 1]]).sum() > 1  # ties straddle the cut
        assert torch.equal(magnitude_trim_(x.clone(), density), argsort_trim(x, density))
        bottom = max(0, n - k - int(0.05 * n))
        keep = torch.zeros(n)
        keep[torch.sort(x.abs(), descending=False).indices[bottom : bottom + k]] = 1
        assert torch.equal(outliers_trim_(x.clone(), density, 0.05), x * keep)
    y = x.view(250, -1) if n % 250 == 0 else x  # a matrix trims as its flattened entries
    assert torch.equal(magnitude_trim_(y.clone(), 0.3), argsort_trim(y, 0.3))


@pytest.mark.parametrize("n", [1000, 300_000])
def test_trim_tie_rules_against_independent_rankings(n):
    """Both tie rules keep exactly k entries where bf16 magnitudes tie across the cut: "mergekit" the ones
    torch's (unstable) argsort ranks first, as mergekit does; "index" the ones a stable ranking puts first,
    derived here with Python's stable `sorted` on (−|x|, index). The same for Model Breadcrumbs' two cuts."""
    from merge.sparsify import magnitude_trim_, outliers_trim_

    x = ((torch.randn(n, generator=torch.Generator().manual_seed(7 + n)) * 8).round() / 8).to(torch.bfloat16).float()
    magnitudes = x.abs().tolist()
    order = sorted(range(n), key=lambda i: -magnitudes[i])  # stable: equal magnitudes in index order
    for density in (0.1, 0.5, 0.9):
        k = int(density * n)
        keep = torch.zeros(n)
        keep[order[:k]] = 1
        index_rule = magnitude_trim_(x.clone(), density, tie_break="index")
        assert torch.equal(index_rule, x * keep)
        mergekit_rule = magnitude_trim_(x.clone(), density, tie_break="mergekit")
        assert torch.equal(mergekit_rule, argsort_trim(x, density))
        assert not torch.equal(index_rule != 0, mergekit_rule != 0)  # the rules differ only in which ties...
        assert int((index_rule != 0).sum()) == int((mergekit_rule != 0).sum()) == k  # ...not in how many
        assert torch.equal(index_rule.abs().sort().values, mergekit_rule.abs().sort().values)
        # Model Breadcrumbs' two cuts on the ascending ranking (5 % outliers)
        bottom = max(0, n - k - int(0.05 * n))
        ascending = sorted(range(n), key=lambda i: magnitudes[i])
        keep = torch.zeros(n)
        keep[ascending[bottom : bottom + k]] = 1
        assert torch.equal(outliers_trim_(x.clone(), density, 0.05, tie_break="index"), x * keep)
        keep = torch.zeros(n)
        keep[torch.sort(x.abs(), descending=False).indices[bottom : bottom + k]] = 1
        assert torch.equal(outliers_trim_(x.clone(), density, 0.05, tie_break="mergekit"), x * keep)
    distinct = torch.randn(5000, generator=torch.Generator().manual_seed(3))  # no ties: both rules agree
    for rule in ("index", "mergekit"):
        keep = torch.zeros(5000)
        keep[torch.argsort(distinct.abs())[4000 - 500 : 5000 - 500]] = 1
        assert torch.equal(outliers_trim_(distinct.clone(), 0.2, 0.1, tie_break=rule), distinct * keep)
    with pytest.raises(ValueError, match="tie_break"):
        magnitude_trim_(x.clone(), 0.5, tie_break="stable")


def test_ties_keeps_one_entry_per_tensor_like_mergekit():
    """mergekit's magnitude trim keeps max(1, int(density · numel)) entries; PEFT's (magnitude_prune here)
    keeps int(density · numel), which is 0 for a 3-entry bias at density 0.2."""
    tvs = {"b": torch.tensor([[0.1, -0.4, 0.2], [0.3, 0.1, -0.2]])}
    ties = methods.get("ties")
    ctx = Context(methods.resolve_params(ties, {"density": 0.2, "tie_break": "index"}), torch.ones(2))
    trimmed = methods.prepare(ties, tvs, ctx)["b"]
    assert torch.equal(trimmed, torch.tensor([[0.0, -0.4, 0.0], [0.3, 0.0, 0.0]]))
    prune = methods.get("magnitude_prune")
    ctx = Context(methods.resolve_params(prune, {"density": 0.2}), torch.ones(2))
    assert torch.equal(methods.prepare(prune, tvs, ctx)["b"], torch.zeros(2, 3))


def test_random_drops_draw_like_one_global_bernoulli():
    """Drops drawn in chunks (no tensor-sized temporaries) take the same stream as one `bernoulli` over the
    whole tensor from torch's global generator, which is how mergekit draws."""
    from merge.sparsify import bernoulli_keep_, della_drop_, della_keep_probabilities

    for n in (5, (1 << 18) + 7, 600_000):
        x = torch.randn(n)
        torch.manual_seed(3)
        ref = x * torch.bernoulli(torch.full_like(x, 0.3))
        assert torch.equal(bernoulli_keep_(x.clone(), 0.3, torch.Generator().manual_seed(3)), ref)
    m = torch.randn(40, 300)
    torch.manual_seed(4)
    ref = m * torch.bernoulli(della_keep_probabilities(m, 0.5, 0.1))
    assert torch.equal(della_drop_(m.clone(), 0.5, 0.1, torch.Generator().manual_seed(4)), ref)


def test_emr_rescalers_span_the_block_by_default():
    t = {"x": torch.tensor([[2.0, -1.0, 1.0], [1.0, 3.0, -2.0]]), "y": torch.tensor([[1.0, 1.0], [-1.0, 4.0]])}
    block = run("emr", t)
    per_tensor = run("emr", t, scope="tensor")
    # x: unified [2, 3, -2], masks [[T, F, F], [T, T, T]]; y: sums 0, 5 -> signs +, +; unified [1, 4]
    # masks y: [[T, T], [F, T]]. Task 0: mass 4 + 2 = 6, kept 2 + (1 + 4) = 7; task 1: mass 6 + 5, kept 7 + 4
    torch.testing.assert_close(block.scales["x"], torch.tensor([6 / 7, 11 / 11]))
    torch.testing.assert_close(block.scales["y"], block.scales["x"])
    torch.testing.assert_close(per_tensor.scales["x"], torch.tensor([2.0, 6 / 7]))
    torch.testing.assert_close(per_tensor.scales["y"], torch.tensor([2 / 5, 5 / 4]))


def test_task_arithmetic_normalize_is_lambda_times_the_weighted_mean(tvs):
    out = run("task_arithmetic", tvs, [1.0, 3.0, 0.0], normalize=True, **{"lambda": 0.6}).vector["w"]
    torch.testing.assert_close(out, 0.6 * (tvs["w"][0] + 3 * tvs["w"][1]) / 4)


def test_tall_masks_and_consensus_with_weights_follow_the_paper():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(4, 50, generator=g)
    w = torch.tensor([1.0, 0.5, 2.0, 1.5])
    wt = t * w[:, None]
    mtl = wt.sum(0)
    masks = torch.stack([wt[k].abs() >= 0.3 * (mtl - wt[k]).abs() for k in range(4)])
    res = run("tall_masks", {"x": t}, w.tolist(), tall_lambda=0.3, **{"lambda": 0.7})
    assert torch.equal(res.masks["x"], masks)
    for k in range(4):
        torch.testing.assert_close(res.task_vector(k, "x"), 0.7 * mtl * masks[k])
    cons = run("consensus", {"x": t}, w.tolist(), tall_lambda=0.3, k=3, **{"lambda": 0.7}).vector["x"]
    torch.testing.assert_close(cons, 0.7 * mtl * (masks.sum(0) >= 3))

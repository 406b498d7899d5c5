"""Merging by rows (merge/streamed.py, the by-rows scan) against merging whole blocks: the same merges,
with tensors cut into many row ranges."""
from __future__ import annotations

import json

import pytest
import torch
from merge_helpers import make_family, shared_rng, spec
from safetensors.torch import load_file

from merge import flexmerge, methods, stats, streamed
from merge.io import ShardWriter
from merge.methods import Context

BY_ROWS = [
    ("linear", {}, 3), ("linear", {"normalize": False}, 2), ("task_arithmetic", {"lambda": 0.8}, 3),
    ("ties", {"density": 0.5}, 3), ("ties", {"density": 0.5, "tie_break": "index"}, 3),
    ("ties", {"density": 0.4, "scope": "global"}, 3), ("ties", {"density": 0.6, "dare": 0.7}, 3),
    ("magnitude_prune", {"density": 0.3}, 3),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}, 3),
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05, "tie_break": "index"}, 3),
    ("dare_ties", {"density": 0.5}, 3), ("dare_linear", {"density": 0.5, "rescale": "density"}, 3),
    ("della", {"density": 0.5, "epsilon": 0.1}, 3), ("della_linear", {"density": 0.4, "epsilon": 0.1}, 3),
    ("consensus", {}, 3), ("model_stock", {}, 3), ("model_stock", {"filter_wise": True}, 3),
    ("slerp", {"t": 0.3}, 2), ("nuslerp", {}, 2), ("nuslerp", {"nuslerp_flatten": False}, 2),
    ("nuslerp", {"nuslerp_on_weights": True}, 2), ("passthrough", {"scale": 0.5}, 1),
]
# These take one angle from whole-tensor float64 sums, which by rows are added in another order.
SUMMED = {"slerp", "nuslerp", "model_stock"}


@pytest.fixture
def tvs():
    g = torch.Generator().manual_seed(5)
    return {"w": torch.randn(3, 13, 6, generator=g), "b": torch.randn(3, 20, generator=g),
            "c": torch.randn(3, 4, 3, 2, generator=g)}


@pytest.mark.parametrize("name, params, K", BY_ROWS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BY_ROWS)])
def test_method_by_row_ranges_equals_the_whole_tensor(tvs, name, params, K):
    """`fn` on row ranges, given `stats` summed over them, concatenates to `fn` on the whole (prepared) tensor."""
    method = methods.get(name)
    params = {k: v for k, v in params.items() if k != "scope"}
    ctx = Context(methods.resolve_params(method, params), torch.tensor([1.0, 0.6, 0.4][:K]), rng=shared_rng(1),
                  base={n: torch.randn(t.shape[1:]) for n, t in tvs.items()})
    assert method.rows_apart(ctx.params)
    prepared = methods.prepare(method, {n: t[:K] for n, t in tvs.items()}, ctx)
    whole = method.fn(prepared, ctx).vector
    for n, t in prepared.items():
        parts, total = [], {}
        step = 3 if t.dim() > 2 else t.shape[1]  # as `stats.spans`: vectors are not cut
        ranges = [(a, min(a + step, t.shape[1])) for a in range(0, t.shape[1], step)]
        for a, b in ranges:
            rows = Context(ctx.params, ctx.weights, base={n: ctx.base[n][a:b]})
            for key, v in (method.stats({n: t[:, a:b]}, rows) if method.stats else {}).items():
                total[key] = total.get(key, 0) + v
        for a, b in ranges:
            rows = Context(ctx.params, ctx.weights, base={n: ctx.base[n][a:b]}, stats=total if method.stats else None)
            parts.append(method.fn({n: t[:, a:b]}, rows).vector[n])
        got = torch.cat(parts)
        if name in SUMMED:
            torch.testing.assert_close(got, whole[n], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got, whole[n]), (name, n)


def test_methods_that_need_whole_tensors_are_not_run_by_rows():
    for name in ("pcb", "emr", "tall_masks", "tsv_m", "iso_c", "iso_cts"):
        method = methods.get(name)
        assert not method.rows_apart(methods.resolve_params(method, {})), name
    ties = methods.get("ties")
    assert not ties.rows_apart(methods.resolve_params(ties, {"scope": "block"}))
    nuslerp = methods.get("nuslerp")
    assert not nuslerp.rows_apart(methods.resolve_params(nuslerp, {"nuslerp_flatten": False, "nuslerp_row_wise": True}))


def _merge(tmp_path, base, models, tag, monkeypatch, by_rows: bool, **extra):
    monkeypatch.setattr(stats, "ROWS", 128)  # tensors of 16 columns: 8 rows a range, 2 to 8 ranges a tensor
    calls = []
    real = streamed.write_group
    monkeypatch.setattr(streamed, "write_group", lambda *a: calls.append(a[2]) or real(*a))
    if not by_rows:
        monkeypatch.setattr(flexmerge.Session, "rows_apart", lambda self, block: False)
    out = tmp_path / tag
    flexmerge.run(spec(base, models, out, **extra))
    monkeypatch.undo()
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    assert not list(out.rglob("*.spill"))
    return tensors, json.loads((out / "manifest.json").read_text())["blocks"], calls


# Each kind of input the by-rows pass handles: no preparation, a preparation spilled per task (trims, drops,
# global thresholds, `dare:`), whole-tensor sums, the base in the method, one model, several groups a block.
END_TO_END = [
    ("linear", {"normalize": False}, 2, 1.0, "tessera"), ("ties", {"density": 0.5}, 3, 1.0, "tessera"),
    ("ties", {"density": 0.4, "scope": "global", "dare": 0.7}, 3, 1.0, "tessera"),
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05, "tie_break": "index"}, 3, 1.0, "tessera"),
    ("dare_ties", {"density": 0.5}, 3, 1.0, "mergekit"), ("della_linear", {"density": 0.5, "epsilon": 0.1}, 3, 1.0, "mergekit"),
    ("model_stock", {}, 3, 1.0, "tessera"), ("slerp", {"t": 0.3}, 2, 1.0, "tessera"),
    ("nuslerp", {"nuslerp_on_weights": True}, 2, 1.0, "tessera"), ("passthrough", {"scale": 0.5}, 1, 1.0, "tessera"),
    ("task_arithmetic", {}, 3, 2.0, "tessera"), ("ties", {"density": 0.5}, 3, 1.5, "tessera"),
]


@pytest.mark.parametrize("name, params, K, size, rng", END_TO_END,
                         ids=[f"{n}-{i}" for i, (n, *_) in enumerate(END_TO_END)])
def test_merge_by_rows_equals_merge_by_blocks(tmp_path, monkeypatch, name, params, K, size, rng):
    base, models = make_family(tmp_path, "llama", tasks=("a", "b", "c")[:K])
    extra = dict(method=name, params=params, size=size, rng=rng, weights={"a": 1.0, "b": 0.6, "c": 0.4} if K > 1 else {})
    if name == "slerp":
        extra["weights"] = {}
    ref, ref_blocks, none = _merge(tmp_path, base, models, "blocks", monkeypatch, False, **extra)
    got, blocks, calls = _merge(tmp_path, base, models, "rows", monkeypatch, True, **extra)
    assert not none and calls and blocks == ref_blocks
    assert ref.keys() == got.keys()
    for n, t in ref.items():
        if name in SUMMED:
            torch.testing.assert_close(got[n], t, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got[n], t), n


def test_scan_by_rows_equals_scan_of_whole_blocks(tmp_path, monkeypatch):
    base, models = make_family(tmp_path, "llama")
    session = flexmerge.Session(spec(base, models, tmp_path / "out", similarity="sign", method="ties",
                                     params={"scope": "global", "density": 0.3}))
    whole = session.scan(on_block=lambda *a: None)
    monkeypatch.setattr(stats, "ROWS", 128)
    rows = session.scan()
    assert rows.base_hash == whole.base_hash and torch.equal(rows.histogram, whole.histogram)
    assert rows.numels == whole.numels
    for a, b in zip(rows.grams + rows.signs, whole.grams + whole.signs):
        assert abs(a - b).max() <= 1e-6 * abs(b).max()
    assert rows.task_matrix_sq_norms == pytest.approx(whole.task_matrix_sq_norms, rel=1e-6)
    assert rows.base_sq_norm == pytest.approx(whole.base_sq_norm, rel=1e-6)


def test_shard_writer_parts_equal_the_whole_tensor(tmp_path):
    t = torch.randn(10, 7)
    for tag, add in (("whole", lambda w: w.add("x", t)),
                     ("parts", lambda w: w.add_parts("x", t.dtype, t.shape, t.numel() * 4, (t[a : a + 3] for a in range(0, 10, 3))))):
        (tmp_path / tag).mkdir()
        w = ShardWriter(tmp_path / tag)
        add(w)
        w.close()
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (tmp_path / "parts" / "model.safetensors").read_bytes()
    (tmp_path / "short").mkdir()
    with pytest.raises(ValueError, match="parts hold"):
        ShardWriter(tmp_path / "short").add_parts("x", t.dtype, t.shape, t.numel() * 4, [t[:3]])

"""The checkpoints people bring: per-task heads, mixed dtypes, mergekit configs with per-tensor
parameters, hub ids from the local cache."""
from __future__ import annotations

import pytest
import torch
import yaml
from merge_helpers import argsort_trim, make_family, rewrite, spec
from safetensors.torch import load_file

from merge.artifact import export, task_state_dict
from merge.config import load_spec
from merge.flexmerge import run
from merge.settings import evaluate

HEAD = "classifier.weight"


def test_heads_of_other_shapes_and_tensors_the_base_lacks_stay_task_specific(tmp_path):
    base, models = make_family(tmp_path, "bert")
    g = torch.Generator().manual_seed(0)
    b = rewrite(models["b"], lambda t: t.update({HEAD: torch.randn(7, 16, generator=g), "classifier.bias": torch.randn(7, generator=g)}))
    c = rewrite(models["c"], lambda t: t.update({"extra_head.weight": torch.randn(5, 16, generator=g)}))
    a = load_file(models["a"] / "model.safetensors")
    run(spec(base, models, tmp_path / "art", size=1, method="task_arithmetic", params={"normalize": True}))
    sa, _ = task_state_dict(tmp_path / "art", "a")
    sb, _ = task_state_dict(tmp_path / "art", "b")
    sc, _ = task_state_dict(tmp_path / "art", "c")
    torch.testing.assert_close(sb[HEAD], b[HEAD])  # b's own 7-class head, unmerged
    torch.testing.assert_close(sb["classifier.bias"], b["classifier.bias"])
    torch.testing.assert_close(sa[HEAD], a[HEAD])  # the head is specific for every task once one differs
    torch.testing.assert_close(sc["extra_head.weight"], c["extra_head.weight"])
    assert "extra_head.weight" not in sa
    base_t = load_file(base / "model.safetensors")
    n = "bert.encoder.layer.0.attention.self.query.weight"
    mean = sum(load_file(models[k] / "model.safetensors")[n] - base_t[n] for k in "abc") / 3
    torch.testing.assert_close(sa[n], base_t[n] + mean)  # the rest is one merged model
    assert sa[n] is sb[n]
    export(tmp_path / "art", "b", tmp_path / "b-out")
    assert load_file(tmp_path / "b-out" / "model.safetensors")[HEAD].shape == (7, 16)


def test_mixed_dtypes_are_cast_to_the_configured_dtype(tmp_path):
    base, models = make_family(tmp_path, "bert")
    orig = load_file(models["b"] / "model.safetensors")
    rewrite(models["b"], lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items() if v.is_floating_point()}))
    rewrite(models["c"], lambda t: t.update({k: v.half() for k, v in t.items() if v.is_floating_point()}))
    run(spec(base, models, tmp_path / "art", size=1, dtype="float16", method="linear"))
    out = load_file(tmp_path / "art" / "model.safetensors")
    n = "bert.encoder.layer.1.output.dense.weight"
    assert out[n].dtype == torch.float16
    a = load_file(models["a"] / "model.safetensors")[n]
    c = load_file(models["c"] / "model.safetensors")[n]
    ref = (a.float() + orig[n].to(torch.bfloat16).float() + c.float()) / 3
    torch.testing.assert_close(out[n].float(), ref, atol=2e-3, rtol=2e-3)
    assert (out[n].float() - ref).abs().max() <= ref.abs().max() * 2**-10 + 1e-6


def test_settings_evaluate_like_mergekit():
    assert evaluate(0.5, "x", 0.3) == 0.5
    assert evaluate([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)  # linear gradient
    assert evaluate([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    rules = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.7}, {"value": 0.1}]
    assert evaluate(rules, "model.layers.3.self_attn.q_proj.weight", 1.0) == pytest.approx(1.0)
    assert evaluate(rules, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.7
    assert evaluate(rules, "model.norm.weight", 0.0) == 0.1
    assert evaluate([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 0.0) is None


def test_a_mergekit_config_with_per_model_and_per_tensor_parameters(tmp_path):
    base, models = make_family(tmp_path, "llama")
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(models["a"]), "parameters": {"weight": 1.0, "density": [0.2, 0.8]}},
            {"model": str(models["b"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.25}, {"value": 0.5}], "density": 0.5}},
            {"model": str(base)},  # mergekit skips the base among the task vectors
        ],
        "parameters": {"normalize": True, "int8_mask": True, "lambda": [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]},
        "dtype": "float32",
    }
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump(cfg))
    s = load_spec(str(path), {"out": str(tmp_path / "out"), "size": 1})
    assert list(s.models) == ["a", "b"] and s.method == "ties"
    run(s)
    out = load_file(tmp_path / "out" / "model.safetensors")
    th0 = load_file(base / "model.safetensors")
    A, B = (load_file(models[k] / "model.safetensors") for k in "ab")
    for n, t, wb, lam in [("model.layers.1.mlp.up_proj.weight", 1.0, 0.25, 1.0),
                          ("model.layers.0.self_attn.q_proj.weight", 0.0, 0.5, 0.5),
                          ("model.norm.weight", 0.0, 0.5, 1.0)]:
        da, db = A[n] - th0[n], B[n] - th0[n]
        ta = argsort_trim(da, 0.2 + 0.6 * t)
        tb = argsort_trim(db, 0.5)
        w = torch.stack([ta * 1.0, tb * wb])
        sign = torch.where(w.sum(0) >= 0, 1.0, -1.0)
        agree = (w.sign() == sign).float()
        div = agree[0] * 1.0 + agree[1] * wb
        ref = th0[n] + lam * (w * agree).sum(0) / torch.where(div == 0, torch.ones_like(div), div)
        torch.testing.assert_close(out[n], ref, msg=n)


def test_rng_mergekit_draws_mergekits_stream(tmp_path):
    """`rng: mergekit` equals mergekit's dare_linear as mergekit draws it: torch's global generator seeded
    once, every tensor in name order (its scheduler's), each model's drops in config order, one bernoulli
    over the whole tensor, rescaled to its L1 norm. A per-model density below 1 for one model only: the
    other model's tensors take no draws."""
    base, models = make_family(tmp_path, "llama", tasks=("a", "b"))
    cfg = {"merge_method": "dare_linear", "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(models["a"]), "parameters": {"weight": 1.0, "density": 0.4}},
                      {"model": str(models["b"]), "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.7}, {"value": 1.0}]}}]}
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run(load_spec(str(path), {"out": str(tmp_path / "out"), "size": 1, "rng": "mergekit", "params": {"seed": 7}}))
    out = load_file(tmp_path / "out" / "model.safetensors")
    th0 = load_file(base / "model.safetensors")
    A, B = (load_file(models[k] / "model.safetensors") for k in "ab")
    torch.manual_seed(7)
    for n in sorted(th0):
        merged = torch.zeros_like(th0[n])
        for m, w, d in ((A, 1.0, 0.4), (B, 0.5, 0.7 if "mlp" in n else 1.0)):
            delta = m[n] - th0[n]
            if d < 1.0:
                kept = delta * torch.bernoulli(torch.full_like(delta, d))
                delta = kept * (delta.abs().sum() / kept.abs().sum())
            merged += w * delta
        torch.testing.assert_close(out[n], th0[n] + merged, msg=n)
    with pytest.raises(ValueError, match="rng: mergekit"):
        run(load_spec(str(path), {"out": str(tmp_path / "out2"), "method": "ties", "rng": "mergekit"}))


def test_hub_ids_come_from_the_local_cache_or_name_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    base, models = make_family(tmp_path / "local", "bert")
    cache = tmp_path / "hub"
    snap = cache / "models--acme--bert-base" / "snapshots" / "0123abcd"
    snap.parent.mkdir(parents=True)
    base.rename(snap)
    (cache / "models--acme--bert-base" / "refs").mkdir()
    (cache / "models--acme--bert-base" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    s = load_spec(None, {"base": "acme/bert-base", "models": {k: str(v) for k, v in models.items()}, "out": str(tmp_path / "o")})
    assert s.base == str(snap)
    run(s)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_spec(None, {"base": "acme/missing", "models": {k: str(v) for k, v in models.items()}})


def test_the_model_card_describes_the_merge_not_the_base(tmp_path):
    base, models = make_family(tmp_path, "bert")
    (base / "README.md").write_text("# The pretrained base\nTrained on books.\n")
    run(spec(base, models, tmp_path / "art", size=2, method="ties", params={"density": 0.4}))
    card = (tmp_path / "art" / "README.md").read_text()
    assert "The pretrained base" not in card
    assert "ties merge of 3 fine-tuned models" in card and '"density": 0.4' in card
    for task, path in models.items():
        assert f"| {task} | `{path}` |" in card
    import json

    size = json.loads((tmp_path / "art" / "manifest.json").read_text())["size"]
    assert f"{size['bytes']:,} bytes" in card and f"{size['multiplier']:.3f}×" in card


def test_export_and_task_loading_read_only_the_tasks_blocks(tmp_path, monkeypatch):
    from merge import artifact
    from foundation.io import Checkpoint

    base, models = make_family(tmp_path, "bert")
    run(spec(base, models, tmp_path / "art", size=2.5))
    read = []
    original = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, names: read.append(list(names)) or original(self, names))
    export(tmp_path / "art", "a", tmp_path / "a-out")
    stored = Checkpoint(tmp_path / "art").names
    assert len(read) > 1 and max(map(len, read)) < len(stored)  # block by block, never the whole artifact
    artifact._STORES.clear()
    state, store = task_state_dict(tmp_path / "art", "a")
    first = set(store.tensors)
    assert first < set(stored)  # task a's tensors only
    read.clear()
    task_state_dict(tmp_path / "art", "b")
    assert set(store.tensors) > first  # b adds its own blocks...
    assert not {k for r in read for k in r} & first  # ...and does not read the shared ones again


def _tokenizer(folder, tokens):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0])).save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("source", ["base", "union", "b"])
def test_vocabulary_mismatch_follows_mergekits_tokenizer_source(tmp_path, source):
    import json

    base, models = make_family(tmp_path, "llama")  # vocab 64, tied embeddings
    E = "model.embed_tokens.weight"
    base_tokens = [f"t{i}" for i in range(64)]
    b_tokens = base_tokens[:60] + [f"x{i}" for i in range(6)]  # drops t60..t63, adds x0..x5
    for folder in (base, models["a"], models["c"]):
        _tokenizer(folder, base_tokens)
    _tokenizer(models["b"], b_tokens)
    g = torch.Generator().manual_seed(1)
    B = rewrite(models["b"], lambda t: t.update({E: torch.cat([t[E][:60], torch.randn(6, 16, generator=g)])}))[E]
    th0, A, C = (load_file(p / "model.safetensors")[E] for p in (base, models["a"], models["c"]))
    run(spec(base, models, tmp_path / "art", size=1, method="linear", tokenizer_source=source))
    out = load_file(tmp_path / "art" / "model.safetensors")[E]
    cfg = json.loads((tmp_path / "art" / "config.json").read_text())
    from merge.vocab import read_vocab

    vocab = read_vocab(tmp_path / "art")
    assert cfg["vocab_size"] == len(vocab) == out.shape[0]
    expected_tokens = {"base": base_tokens, "union": base_tokens + [f"x{i}" for i in range(6)], "b": b_tokens}[source]
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == expected_tokens
    # a token every model has: the plain mean
    torch.testing.assert_close(out[vocab["t5"]], (A[5] + B[5] + C[5]) / 3)
    if "t62" in vocab:  # b lacks it: b takes the base's row, so its task vector there is zero
        torch.testing.assert_close(out[vocab["t62"]], (A[62] + th0[62] + C[62]) / 3)
    if "x3" in vocab:  # only b has it: every checkpoint takes b's row
        torch.testing.assert_close(out[vocab["x3"]], B[63])


def test_checkpoints_with_bool_tensors_merge(tmp_path):
    base, models = make_family(tmp_path, "bert")
    mask = torch.tensor([True, False, True, True, False])
    for folder in (base, *models.values()):
        rewrite(folder, lambda t: t.update({"attention_mask_buffer": mask.clone()}))
    run(spec(base, models, tmp_path / "art", size=1))
    out = load_file(tmp_path / "art" / "model.safetensors")
    assert out["attention_mask_buffer"].dtype == torch.bool and torch.equal(out["attention_mask_buffer"], mask)

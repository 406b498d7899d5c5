"""Artifacts: round trip against models built directly, sharing between tasks, export, sizes 1 and M."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from merge_helpers import build, make_family
from safetensors.torch import load_file

from merge import methods
from merge.artifact import export, is_artifact, load_task_model, task_state_dict
from merge.config import load_spec
from merge.flexmerge import run
from foundation.io import Checkpoint


def merge_to(tmp_path, base, models, name="out", **spec):
    cfg = {"base": str(base), "models": {k: str(v) for k, v in models.items()}, "out": str(tmp_path / name), **spec}
    run(load_spec(None, cfg))
    return tmp_path / name


def expected_state(base, models, manifest, task):
    """θ for `task` built directly: for each block, the method applied to the group's task vectors."""
    b = Checkpoint(base)
    theta0 = b.read(b.names)
    ckpts = {t: Checkpoint(p) for t, p in models.items()}
    method = methods.get(manifest["method"])
    state = {}
    for block in manifest["blocks"]:
        group = next(g for g in block["groups"] if task in g["tasks"])
        members = group["tasks"]
        if len(members) == 1:
            state.update(ckpts[task].read(block["tensors"]))
            continue
        tvs = {n: torch.stack([ckpts[m].read([n])[n].float() - theta0[n].float() for m in members]) for n in block["tensors"]}
        ctx = methods.Context(manifest["params"], torch.ones(len(members)),
                              rng=methods.seeded_rng(manifest["params"]["seed"], block["name"], members))
        res = methods.apply(method, tvs, ctx)
        pos = members.index(task)
        for n in block["tensors"]:
            state[n] = (theta0[n].float() + res.task_vector(pos, n)).to(theta0[n].dtype)
    return state


@pytest.mark.parametrize("method, size", [("task_arithmetic", 2.0), ("ties", 1.5), ("emr", 2.5), ("tall_masks", 2.5)])
def test_round_trip_equals_model_built_directly(tmp_path, method, size):
    base, models = make_family(tmp_path, "bert")
    out = merge_to(tmp_path, base, models, method=method, size=size)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["size"]["multiplier"] <= size
    assert any(len(g["tasks"]) > 1 for b in manifest["blocks"] for g in b["groups"])
    x = torch.randint(0, 64, (2, 7))
    for task in models:
        model = load_task_model(out, task)
        ref_state = expected_state(base, models, manifest, task)
        got = model.state_dict()
        for n, t in ref_state.items():
            torch.testing.assert_close(got[n], t, msg=n)
        ref = build("bert")
        ref.load_state_dict(ref_state, strict=False)
        torch.testing.assert_close(model(x).logits, ref(x).logits)


def test_shared_blocks_are_the_same_tensors_across_tasks(tmp_path):
    base, models = make_family(tmp_path, "llama")
    out = merge_to(tmp_path, base, models, size=1.5)
    manifest = json.loads((out / "manifest.json").read_text())
    a, b = load_task_model(out, "a"), load_task_model(out, "b")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for block in manifest["blocks"]:
        together = any({"a", "b"} <= set(g["tasks"]) for g in block["groups"])
        for n in block["tensors"]:
            assert (pa[n].data_ptr() == pb[n].data_ptr()) == together, n
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied weights stay tied


def test_size_m_reproduces_every_fine_tuned_model_exactly(tmp_path):
    base, models = make_family(tmp_path, "clip")
    out = merge_to(tmp_path, base, models, method="ties", size=3)
    for task, path in models.items():
        ref = Checkpoint(path)
        state, _ = task_state_dict(out, task)
        for n in ref.names:
            assert torch.equal(state[n], ref.read([n])[n]), n


def test_size_one_parameter_only_is_a_standard_checkpoint(tmp_path):
    base, models = make_family(tmp_path, "vit")
    out = merge_to(tmp_path, base, models, method="task_arithmetic", params={"lambda": 0.5}, size=1)
    hf = T.ViTForImageClassification.from_pretrained(out)
    theta0 = load_file(base / "model.safetensors")
    tvs = [load_file(p / "model.safetensors") for p in models.values()]
    for n, p in hf.state_dict().items():
        if n in theta0:
            torch.testing.assert_close(p, theta0[n] + 0.5 * sum(t[n] - theta0[n] for t in tvs))
    assert is_artifact(out) and not is_artifact(base)


def test_export_loads_in_transformers_and_matches_task_model(tmp_path):
    base, models = make_family(tmp_path, "t5")
    out = merge_to(tmp_path, base, models, method="emr", size=2.5)
    export(out, "b", tmp_path / "exported")
    assert not (tmp_path / "exported" / "manifest.json").exists()
    hf = T.T5ForConditionalGeneration.from_pretrained(tmp_path / "exported").eval()
    mine = load_task_model(out, "b")
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(hf(input_ids=ids, decoder_input_ids=ids).logits, mine(input_ids=ids, decoder_input_ids=ids).logits)


def test_sharded_input_and_output_and_dtype(tmp_path):
    base, models = make_family(tmp_path, "bert", max_shard_size="20KB")
    assert (base / "model.safetensors.index.json").exists()
    out = merge_to(tmp_path, base, models, size=2, max_shard_size="16KiB", dtype="bfloat16")
    assert (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    manifest = json.loads((out / "manifest.json").read_text())
    stored = Checkpoint(out)
    assert {stored.dtype[n] for n in stored.names} == {torch.bfloat16}
    # the accounting is the stored tensor bytes, exactly
    assert sum(stored.nbytes(n) for n in stored.names) == manifest["size"]["bytes"]
    model = load_task_model(out, "c", dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32


def test_modulated_accounting_matches_stored_bytes(tmp_path):
    base, models = make_family(tmp_path, "llama")
    out = merge_to(tmp_path, base, models, method="emr", size=3)  # nothing merged; a smaller budget forces merges
    full = json.loads((out / "manifest.json").read_text())["size"]["bytes"]
    out2 = merge_to(tmp_path, base, models, name="small", method="emr", size=f"{int(full * 0.8)}B")
    stored = Checkpoint(out2)
    manifest = json.loads((out2 / "manifest.json").read_text())
    assert manifest["size"]["bytes"] <= full * 0.8
    assert sum(stored.nbytes(n) for n in stored.names) == manifest["size"]["bytes"]
    assert any(n.endswith("::mask") for n in stored.names) and any(n.endswith("::base") for n in stored.names)


def test_checkpoint_format_renames_are_applied_and_tensors_still_shared(tmp_path):
    """transformers 5 saves ViT under legacy names and renames them on load; so must load_task_model."""
    base, models = make_family(tmp_path, "vit")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in Checkpoint(base).names
    out = merge_to(tmp_path, base, models, size=1)
    a, b = load_task_model(out, "a"), load_task_model(out, "b")
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(a.parameters(), b.parameters()))
    hf = T.ViTForImageClassification.from_pretrained(out).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(a(pixel_values=x).logits, hf(pixel_values=x).logits)


def test_engine_load_builds_the_task_model_from_an_artifact(tmp_path):
    import engine

    base, models = make_family(tmp_path, "bert")
    out = merge_to(tmp_path, base, models, size=2)
    model = engine.load(str(out), task="b", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    ref = load_task_model(out, "b")
    x = torch.randint(0, 64, (1, 6))
    torch.testing.assert_close(model(x).logits.float(), ref(x).logits, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="pass task=<name>"):
        engine.load(str(out))


def test_bfloat16_checkpoints_keep_their_dtype(tmp_path):
    base, models = make_family(tmp_path, "llama", scale=0.01)
    for folder in [base, *models.values()]:
        T.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(torch.bfloat16).save_pretrained(folder)
    out = merge_to(tmp_path, base, models, size=1, params={"lambda": 0.5})
    stored = Checkpoint(out)
    assert {stored.dtype[n] for n in stored.names} == {torch.bfloat16}
    theta0 = load_file(base / "model.safetensors")
    tvs = [load_file(p / "model.safetensors") for p in models.values()]
    for n, t in load_file(out / "model.safetensors").items():
        ref = theta0[n].float() + 0.5 * sum(v[n].float() - theta0[n].float() for v in tvs)
        torch.testing.assert_close(t, ref.to(torch.bfloat16))

"""Block discovery on the real module trees of tiny HF models: auto and the family presets."""
from __future__ import annotations

import re

import pytest
from merge_helpers import build

from merge.blocks import assign


@pytest.mark.parametrize("kind", ["bert", "llama", "t5", "clip", "vit"])
def test_presets_and_auto_cut_every_layer_into_attention_mlp_norms(kind):
    names = list(build(kind).state_dict())
    preset = {b.name: b.tensors for b in assign(names, kind)}
    auto = {b.name: b.tensors for b in assign(names, "auto")}
    assert preset == auto
    assert sorted(sum(preset.values(), [])) == sorted(names)  # every tensor in exactly one block
    layers = {re.match(r"(.*\.\d+)\.", b).group(1) for b in preset if re.match(r".*\.\d+\.", b)}
    assert len(layers) == 2  # two layers (T5: one encoder block and one decoder block)
    for layer in layers:
        assert {f"{layer}.attn", f"{layer}.mlp", f"{layer}.norms"} <= set(preset)
    assert "embeddings" in preset
    for name, tensors in preset.items():
        if name.endswith(".norms"):
            assert all(re.search(r"(?i)norm", t) for t in tensors), tensors
        if name.endswith(".mlp"):
            assert not any(re.search(r"(?i)attn|attention|norm", t) for t in tensors), tensors


def test_bert_layer_norms_and_t5_cross_attention():
    bert = {b.name: b.tensors for b in assign(list(build("bert").state_dict()), "bert")}
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in bert["bert.encoder.layer.0.norms"]
    assert bert["head"] == ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
    t5 = {b.name: b.tensors for b in assign(list(build("t5").state_dict()), "t5")}
    assert all("EncDecAttention" in t for t in t5["decoder.block.0.cross_attn"])
    assert t5["final_norms"] == ["encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"]


def test_user_rules_then_auto_for_the_rest():
    names = list(build("llama").state_dict())
    blocks = {b.name: b.tensors for b in assign(names, [r"^model\.(layers\.\d+)\.", {"pattern": r"embed", "name": "emb"}])}
    assert blocks["layers.0"] == [n for n in names if n.startswith("model.layers.0.")]
    assert blocks["emb"] == ["model.embed_tokens.weight"]
    assert blocks["final_norms"] == ["model.norm.weight"]


def test_bad_rules_are_clear_errors():
    with pytest.raises(ValueError, match="unknown block preset 'gpt9'"):
        assign(["a.weight"], "gpt9")
    with pytest.raises(ValueError, match="invalid block regex"):
        assign(["a.weight"], ["(unclosed"])

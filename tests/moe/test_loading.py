"""engine.load loads what was saved: checkpoints written by transformers for every family and layout, dense
models as plain transformers, and every kind of bad input refused with the tensor and file named."""
import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import engine
from engine.families import FAMILIES
from engine.lora import AdapterPool, LoRAModel, peft_weighted_model
from engine.moe.patch import moe_blocks
from engine.registry import ModelEntry, build_tiny, materialize_tiny, register_model, transformers_class

# (family, the transformers class that saved the checkpoint): encoder-only, encoder-decoder and decoders.
SAVED = [("switch_transformers", "SwitchTransformersEncoderModel"),
         ("switch_transformers", "SwitchTransformersForConditionalGeneration"),
         ("mixtral", "MixtralForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM"),
         ("qwen3_moe", "Qwen3MoeForCausalLM"), ("olmoe", "OlmoeForCausalLM"), ("bert_moe", "BertMoeModel"),
         ("olmoe", "OlmoeModel")]


def save(family: str, class_name: str, folder: Path, **save_kwargs) -> Path:
    """A tiny model of `class_name` with seeded random weights (routers too), saved by transformers."""
    family = FAMILIES[family]
    cls = transformers_class(class_name, family.tiny_config())
    build_tiny(family, {}, cls, torch.float32).save_pretrained(folder, **save_kwargs)
    return folder


def inputs_for(model) -> dict:
    ids = torch.randint(2, 90, (2, 5), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "decoder_input_ids": ids[:, :3]} if model.config.is_encoder_decoder else {"input_ids": ids}


def output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family, class_name", SAVED)
def test_checkpoints_saved_by_transformers_load_as_saved(tmp_path, family, class_name):
    folder = save(family, class_name, tmp_path / "m")
    model = engine.load(folder, backend="torch", device="cpu")
    assert type(model).__name__ == class_name and moe_blocks(model)
    reference = type(model).from_pretrained(folder).eval()
    inputs = inputs_for(model)
    torch.testing.assert_close(output(model, inputs), output(reference, inputs), rtol=1e-5, atol=1e-5)


def test_the_entry_class_wins_and_a_wrong_one_names_what_is_missing_or_unused(tmp_path):
    encoder = save("switch_transformers", "SwitchTransformersEncoderModel", tmp_path / "encoder")
    register_model(name="enc-as-seq2seq", family="switch_transformers", source=str(encoder),
                   model_class="SwitchTransformersForConditionalGeneration")
    with pytest.raises(ValueError, match=rf"{encoder}: the checkpoint lacks \d+ weights that "
                                         r"SwitchTransformersForConditionalGeneration needs.*decoder\.block"):
        engine.load("enc-as-seq2seq", device="cpu")
    full = save("switch_transformers", "SwitchTransformersForConditionalGeneration", tmp_path / "full")
    register_model(name="seq2seq-as-enc", family="switch_transformers", source=str(full),
                   model_class="SwitchTransformersEncoderModel")
    with pytest.raises(ValueError, match=r"has \d+ tensors that SwitchTransformersEncoderModel does not use.*decoder"):
        engine.load("seq2seq-as-enc", device="cpu")


def test_a_mis_shaped_tensor_is_named(tmp_path):
    folder = save("mixtral", "MixtralForCausalLM", tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{folder}: the checkpoint has 1 tensors of the wrong shape.*{key} \(31, 32\)"):
        engine.load(folder, device="cpu")


def test_a_sharded_index_naming_a_missing_file(tmp_path):
    folder = save("qwen2_moe", "Qwen2MoeForCausalLM", tmp_path / "m", max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (folder / gone).unlink()
    with pytest.raises(FileNotFoundError, match=rf"puts tensor\(s\) \[.+\] in {gone}, which is missing"):
        engine.load(folder, device="cpu")


def test_a_header_that_lies_about_its_lengths(tmp_path):
    folder = save("olmoe", "OlmoeForCausalLM", tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # the last tensor's bytes cut short
    with pytest.raises(ValueError, match=f"{path}: truncated or corrupt: tensor "):
        engine.load(folder, device="cpu")


def test_an_architecture_transformers_does_not_know(tmp_path):
    folder = save("mixtral", "MixtralForCausalLM", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MixtralForTeleportation"]}))
    with pytest.raises(ValueError, match=rf"{folder}/config.json: architectures names model class "
                                         r"'MixtralForTeleportation', which transformers .* does not have"):
        engine.load(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no_such_type"}))
    with pytest.raises(ValueError, match=rf"{folder}/config.json: transformers .* cannot read it"):
        engine.load(folder, device="cpu")


def _dense(kind: str, folder: Path) -> Path:
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    return folder


def save_adapter(model, folder: Path, seed: int, targets) -> Path:
    """A PEFT LoRA folder with random, non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                                 init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_dense_models_load_as_plain_transformers_and_mix_lora_adapters_like_peft(tmp_path, kind):
    folder = _dense(kind, tmp_path / "base")
    base = engine.load(folder, device="cpu")
    assert base.tessera_entry.family == "dense" and not moe_blocks(base)
    reference = type(base).from_pretrained(folder).eval()
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(output(base, {"input_ids": ids}), output(reference, {"input_ids": ids}))
    dirs = {n: save_adapter(base, tmp_path / n, seed=40 + i, targets=("q_proj", "v_proj", "down_proj"))
            for i, n in enumerate(["x", "y"])}
    lm = engine.load(folder, device="cpu", adapters=dirs)
    assert isinstance(lm, LoRAModel)
    mixes = [{"x": 0.3, "y": 0.7}, {}, {"x": 1.0}]
    got = lm(input_ids=ids, adapter_weights=mixes).logits
    pool = AdapterPool(dirs)
    with torch.no_grad():
        for row, mix in enumerate(mixes):
            oracle = peft_weighted_model(copy.deepcopy(reference), pool, mix) if mix else reference
            torch.testing.assert_close(got[row:row + 1], oracle(input_ids=ids[row:row + 1]).logits,
                                       rtol=1e-4, atol=1e-4)


def test_tiny_cache_key_follows_the_family_defaults(monkeypatch):
    register_model(ModelEntry(name="tiny-key", family="olmoe", source="tiny"))
    from engine.registry import get_model_entry

    before = materialize_tiny(get_model_entry("tiny-key"))
    family = FAMILIES["olmoe"]
    original = family.tiny_config
    monkeypatch.setattr(family, "tiny_config", lambda **kw: original(**{"intermediate_size": 16, **kw}))
    after = materialize_tiny(get_model_entry("tiny-key"))
    assert after != before
    assert transformers.AutoConfig.from_pretrained(after).intermediate_size == 16
    monkeypatch.setattr(family, "auto_class", "AutoModel")
    bare = materialize_tiny(get_model_entry("tiny-key"))
    assert bare != after and transformers.AutoConfig.from_pretrained(bare).architectures == ["OlmoeModel"]


def test_tests_write_only_to_a_temporary_cache():
    from foundation.cache import cache_dir

    assert not cache_dir().resolve().is_relative_to(Path.home().resolve() / ".cache")

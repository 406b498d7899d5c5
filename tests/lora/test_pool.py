"""Bad adapters fail on registration with an error that names the problem."""
import copy
import json
import shutil

import pytest

from engine.lora import AdapterError, AdapterPool, attach_adapters

from lora_helpers import save_adapter, tiny_llama


def _clone(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_good_pool_reads_headers_only(adapter_dirs):
    pool = AdapterPool(adapter_dirs, base_model="tessera/tiny-llama")
    assert pool.rank == 4 and len(pool) == 4
    assert set(pool.shapes) == {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}
    assert pool.spec("gamma").scale == pytest.approx(12.0 / 2.0)  # rsLoRA: alpha / sqrt(r)
    assert pool.spec("beta").scale == pytest.approx(8.0 / 4)


def test_wrong_base_model(adapter_dirs, tmp_path):
    folder = _clone(adapter_dirs["alpha"], tmp_path / "a")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/other-model"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="trained on base model 'someone/other-model'"):
        AdapterPool({"a": folder}, base_model="tessera/tiny-llama")


def test_wrong_rank_and_wrong_targets(llama, adapter_dirs, tmp_path):
    pool = AdapterPool({"alpha": adapter_dirs["alpha"]})
    with pytest.raises(AdapterError, match="has rank 8 but the pool's adapters have rank 4"):
        pool.add("r8", save_adapter(llama, tmp_path / "r8", seed=1, r=8))
    with pytest.raises(AdapterError, match="adapts different modules"):
        pool.add("k", save_adapter(llama, tmp_path / "k", seed=1, targets=("k_proj",)))


def test_config_rank_disagrees_with_weights(adapter_dirs, tmp_path):
    folder = _clone(adapter_dirs["alpha"], tmp_path / "a")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["r"] = 2
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="rank 4/4 but the config says r=2"):
        AdapterPool({"a": folder})


def test_corrupt_or_missing_files(adapter_dirs, tmp_path):
    folder = _clone(adapter_dirs["alpha"], tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(AdapterError, match="cannot read"):
        AdapterPool({"a": folder})
    weights.unlink()
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="pickled adapter_model.bin files are refused"):
        AdapterPool({"a": folder})
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        AdapterPool({"a": folder})
    with pytest.raises(AdapterError, match="is not a directory"):
        AdapterPool({"b": tmp_path / "missing"})


def test_model_with_other_shapes_is_refused(adapter_dirs):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(AdapterError, match="wrong base model"):
        attach_adapters(other, adapter_dirs)
    shallow = copy.deepcopy(tiny_llama())
    shallow.model.layers = shallow.model.layers[:1]
    with pytest.raises(AdapterError, match="does not have"):
        attach_adapters(shallow, adapter_dirs)


def test_base_model_name_is_checked_against_the_model(adapter_dirs):
    model = tiny_llama()
    model.config._name_or_path = "/cache/hub/models--tessera--tiny-llama/snapshots/abc"  # same model, cached
    attach_adapters(model, adapter_dirs)
    other = tiny_llama()
    other.config._name_or_path = "someone/else"
    with pytest.raises(AdapterError, match="trained on 'tessera/tiny-llama' but the model is 'someone/else'"):
        attach_adapters(other, adapter_dirs)
    attach_adapters(other, AdapterPool(adapter_dirs, base_model="tessera/tiny-llama"))  # "it is that model"

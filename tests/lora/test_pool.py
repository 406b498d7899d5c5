"""Bad adapters fail on registration with an error that names the adapter and the problem, and leave the pool
(and a live model's pool, cache and outputs) as they were."""
import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.lora import AdapterError, AdapterPool, attach_adapters

from lora_helpers import save_adapter, tiny_llama


def _clone(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_good_pool_reads_headers_only(adapter_dirs):
    pool = AdapterPool(adapter_dirs, base_model="tessera/tiny-llama")
    assert pool.rank == 4 and len(pool) == 4
    assert set(pool.shapes) == {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}
    q0 = "model.layers.0.self_attn.q_proj"
    assert pool.spec("gamma").modules[q0].scale == pytest.approx(12.0 / 2.0)  # rsLoRA: alpha / sqrt(r)
    assert pool.spec("beta").modules[q0].scale == pytest.approx(8.0 / 4)


def test_wrong_base_model(adapter_dirs, tmp_path):
    folder = _clone(adapter_dirs["alpha"], tmp_path / "a")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/other-model"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="trained on base model 'someone/other-model'"):
        AdapterPool({"a": folder}, base_model="tessera/tiny-llama")


def test_other_ranks_and_targets_join_the_pool(llama, adapter_dirs, tmp_path):
    pool = AdapterPool({"alpha": adapter_dirs["alpha"]})
    pool.add("r8", save_adapter(llama, tmp_path / "r8", seed=1, r=8))
    pool.add("k", save_adapter(llama, tmp_path / "k", seed=1, targets=("k_proj",)))
    assert pool.rank == 8 and "model.layers.1.self_attn.k_proj" in pool.shapes


def _edit_config(src, dst, **changes):
    folder = _clone(src, dst)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def test_rank_zero_nan_duplicate_and_pickle_leave_the_pool_untouched(adapter_dirs, tmp_path):
    pool = AdapterPool({"alpha": adapter_dirs["alpha"]})
    before = (pool.names, pool.version, pool.shapes)
    with pytest.raises(AdapterError, match="adapter 'zero': field r=0 must be a positive integer"):
        pool.add("zero", _edit_config(adapter_dirs["beta"], tmp_path / "zero", r=0))
    with pytest.raises(AdapterError, match=r"adapter 'zp': field rank_pattern\['q_proj'\]=0"):
        pool.add("zp", _edit_config(adapter_dirs["beta"], tmp_path / "zp", rank_pattern={"q_proj": 0}))
    nan = _clone(adapter_dirs["beta"], tmp_path / "nan")
    tensors = load_file(str(nan / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=f"adapter 'nan': tensor '{key}' holds NaN or inf"):
        pool.add("nan", nan)
    with pytest.raises(AdapterError, match="adapter 'alpha' is already loaded"):
        pool.add("alpha", adapter_dirs["beta"])
    pickled = _clone(adapter_dirs["beta"], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({}, pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="adapter 'pickled': .*pickled adapter_model.bin files are refused"):
        pool.add("pickled", pickled)
    assert (pool.names, pool.version, pool.shapes) == before


def test_live_load_and_unload(llama, adapter_dirs, tmp_path):
    """load_adapter/unload_adapter on a running model: refusals leave outputs and the pool unchanged."""
    lm = attach_adapters(copy.deepcopy(llama), {"alpha": adapter_dirs["alpha"]}, backend="torch")
    ids = torch.randint(3, 96, (1, 5))
    before = lm(input_ids=ids, adapter_weights=[{"alpha": 1.0}]).logits
    other = tiny_llama()
    other.model.layers = other.model.layers[:1]
    other.config._name_or_path = "someone/else"
    with pytest.raises(AdapterError, match="adapter 'wrong' was trained on 'someone/else'"):
        lm.load_adapter("wrong", save_adapter(other, tmp_path / "wrong", seed=9))
    wide = tiny_llama(vocab_size=96)
    with pytest.raises(AdapterError, match="adapter 'alpha' is already loaded"):
        lm.load_adapter("alpha", adapter_dirs["beta"])
    assert lm.pool.names == ["alpha"]
    lm.load_adapter("mlp16", save_adapter(wide, tmp_path / "mlp16", seed=7, r=16, targets=("up_proj", "q_proj")))
    assert lm.cache.capacity == 2
    # q_proj is now padded to rank 16: the same sums, BLAS may block them differently
    torch.testing.assert_close(lm(input_ids=ids, adapter_weights=[{"alpha": 1.0}]).logits, before, rtol=1e-6,
                               atol=1e-6)
    mixed = lm(input_ids=ids, adapter_weights=[{"mlp16": 1.0}]).logits
    assert not torch.allclose(mixed, before)
    running = lm.cache.acquire(["mlp16"])  # a batch that holds the adapter
    with pytest.raises(AdapterError, match="adapter 'mlp16' is in use by 1 running batch"):
        lm.unload_adapter("mlp16")
    lm.cache.release(running)
    lm.unload_adapter("mlp16")
    assert lm.pool.names == ["alpha"]
    with pytest.raises(Exception, match="unknown adapter 'mlp16'"):
        lm(input_ids=ids, adapter_weights=[{"mlp16": 1.0}])
    torch.testing.assert_close(lm(input_ids=ids, adapter_weights=[{"alpha": 1.0}]).logits, before, rtol=0, atol=0)


def test_config_rank_disagrees_with_weights(adapter_dirs, tmp_path):
    folder = _clone(adapter_dirs["alpha"], tmp_path / "a")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["r"] = 2
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="adapter 'a': module .* has rank 4/4 but the config says r=2"):
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
    with pytest.raises(AdapterError, match="adapter 'alpha': .* is 48->48 in the model .*wrong base model"):
        attach_adapters(other, adapter_dirs)
    shallow = copy.deepcopy(tiny_llama())
    shallow.model.layers = shallow.model.layers[:1]
    with pytest.raises(AdapterError, match="adapter 'alpha' adapts 'model.layers.1.self_attn.q_proj', which the model "
                                           "does not have"):
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

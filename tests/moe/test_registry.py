"""The model registry and the errors a user meets on bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import engine
from engine.families import patch_moe
from engine.moe.patch import moe_blocks
from engine.registry import ModelEntry, get_model_entry, load_config_dir, materialize_tiny, register_model

ROOT = Path(__file__).resolve().parents[2]


def test_yaml_entries_and_code_registration(tmp_path):
    (tmp_path / "mine.yaml").write_text("name: my-olmoe\nfamily: olmoe\nsource: tiny\noptions: {seed: 3}\n")
    load_config_dir(tmp_path)
    assert get_model_entry("my-olmoe").options == {"seed": 3}
    register_model(ModelEntry(name="code-mixtral", family="mixtral", source="tiny", backend="reference"))
    model = engine.load("code-mixtral", device="cpu")
    assert {b.backend for _, b in moe_blocks(model)} == {"reference"}
    assert {e.name for e in engine.list_models()} >= {"tiny-switch", "tiny-mixtral", "switch-base-8"}


def test_tiny_models_are_seeded_and_cached():
    entry = get_model_entry("tiny-olmoe")
    first = materialize_tiny(entry)
    assert materialize_tiny(entry) == first
    a = load_file(first / "model.safetensors")
    register_model(ModelEntry(name="tiny-olmoe-seed1", family="olmoe", source="tiny", options={"seed": 1}))
    b = load_file(materialize_tiny(get_model_entry("tiny-olmoe-seed1")) / "model.safetensors")
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_local_folder_loads_like_a_name():
    folder = materialize_tiny(get_model_entry("tiny-qwen2-moe"))
    model = engine.load(str(folder), device="cpu")
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and moe_blocks(model)


def test_unknown_name_lists_known_models():
    with pytest.raises(KeyError, match="unknown model 'no-such-model'.*tiny-mixtral"):
        engine.load("no-such-model")


def test_hub_id_missing_from_cache_says_what_to_download():
    register_model(ModelEntry(name="not-cached", family="switch_transformers", source="tessera-tests/not-a-model"))
    with pytest.raises(FileNotFoundError, match="hf download tessera-tests/not-a-model"):
        engine.load("not-cached")
    with pytest.raises(FileNotFoundError, match="never downloads at run time"):
        engine.load("tessera-tests/not-a-model")


def test_weights_that_do_not_match_the_config(tmp_path):
    folder = materialize_tiny(get_model_entry("tiny-mixtral"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    block = model.model.layers[0].mlp
    block.experts.gate_up_proj = torch.nn.Parameter(block.experts.gate_up_proj[:, :-2].clone())
    with pytest.raises(ValueError, match=r"experts.gate_up_proj has shape \(4, 78, 32\).*\(4, 80, 32\)"):
        patch_moe(model, backend="torch")


def test_checkpoint_without_safetensors_is_refused(tmp_path):
    folder = materialize_tiny(get_model_entry("tiny-mixtral"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        engine.load(str(tmp_path))


def test_non_finite_router_logits_raise_naming_the_block():
    model = engine.load("tiny-mixtral", backend="torch", device="cpu")
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match=r"model.layers.1.mlp"):
            model(torch.randint(0, 100, (1, 4)))


def test_triton_backend_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("triton is available on CUDA")
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable on cpu"):
        engine.load("tiny-mixtral", backend="triton", device="cpu")


def test_unknown_backend_and_capacity():
    with pytest.raises(ValueError, match="unknown MoE backend 'fast'"):
        engine.load("tiny-mixtral", backend="fast", device="cpu")
    with pytest.raises(ValueError, match="capacity must be"):
        engine.load("tiny-mixtral", capacity="tight", device="cpu")


def test_engine_imports_and_runs_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import engine, torch\n"
            "m = engine.load('tiny-mixtral', device='cpu')\n"
            "print(m(torch.randint(0, 100, (1, 3))).logits.shape)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 3, 128])" in result.stdout

"""Fixtures shared by the LoRA tests."""
import pytest

from lora_helpers import save_adapter, tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, llama):
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_adapter(llama, root / name, seed=i, alpha=4.0 + 4 * i, rslora=(name == "gamma"))
            for i, name in enumerate(["alpha", "beta", "gamma", "delta"])}

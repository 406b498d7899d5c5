"""Shared test setup: no hub access, every cache in one temporary folder (nothing is written to the home
directory), Triton through its interpreter when there is no GPU, fixed seeds, and a registry that each test
leaves as it found it."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Set before anything reads them; rank processes and servers started by tests inherit them.
_CACHE = tempfile.mkdtemp(prefix="tessera-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["TESSERA_CACHE"] = os.path.join(_CACHE, "tessera")
os.environ["HF_HOME"] = os.path.join(_CACHE, "hf")
os.environ["HF_HUB_CACHE"] = os.path.join(_CACHE, "hf", "hub")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_CACHE, "triton"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))
os.environ.setdefault("XDG_CACHE_HOME", os.path.join(_CACHE, "xdg"))  # torch hub, matplotlib, pip, ...
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_CACHE, "matplotlib"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before triton is first imported: kernels then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _registry_unchanged():
    """Entries and families a test registers are gone after it."""
    from engine import registry
    from engine.families import FAMILIES

    saved = (dict(registry._REGISTRY), dict(registry._ADAPTERS), set(registry._LOADED_DIRS), dict(FAMILIES))
    yield
    for live, old in zip((registry._REGISTRY, registry._ADAPTERS, registry._LOADED_DIRS, FAMILIES), saved):
        live.clear()
        live.update(old)

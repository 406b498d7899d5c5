"""Make this folder's helpers (harness, models) importable by the tests and by the spawned rank processes."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")])


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Standard Hugging Face checkpoints: Switch (encoder-decoder), Mixtral (on-disk names differ from module
    names), Qwen2-MoE (shared expert) written as several safetensors shards with an index."""
    from parallel_models import build

    folders = {}
    for family, shard in (("switch_transformers", None), ("mixtral", None), ("qwen2_moe", "40KB")):
        folder = tmp_path_factory.mktemp(family)
        build(family, backend=None).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        folders[family] = str(folder)
    return folders

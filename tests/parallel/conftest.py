"""Make this folder's helpers importable by the tests (spawned rank processes inherit `sys.path` from the
parent through multiprocessing), and checkpoints shared by the two- and three-rank tests."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Standard Hugging Face checkpoints: Switch (encoder-decoder), Mixtral (on-disk names differ from module
    names), Qwen2-MoE (shared expert) written as several safetensors shards with an index, BERT-MoE (experts
    stacked in one tensor per matrix, with biases)."""
    from parallel_models import build

    folders = {}
    for family, shard in (("switch_transformers", None), ("mixtral", None), ("qwen2_moe", "40KB"),
                          ("bert_moe", None)):
        folder = tmp_path_factory.mktemp(family)
        build(family, backend=None).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        folders[family] = str(folder)
    return folders

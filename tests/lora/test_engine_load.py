"""engine.load(name, adapters=...) on the registry's tiny Mixtral: LoRA on attention projections, MoE blocks
on tessera's layer, rows mixing adapters like PEFT's merged adapter does."""
import copy

import pytest
import torch

import engine
from engine.lora import AdapterPool, LoRAModel, peft_weighted_model

from lora_helpers import save_adapter

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def test_load_with_adapters_matches_peft(tmp_path):
    base = engine.load("tiny-mixtral", device="cpu")
    dirs = {n: save_adapter(base, tmp_path / n, seed=20 + i, targets=TARGETS) for i, n in enumerate(["x", "y"])}
    lm = engine.load("tiny-mixtral", device="cpu", adapters=dirs)
    assert isinstance(lm, LoRAModel)
    ids = torch.randint(3, base.config.vocab_size, (3, 6))
    mixes = [{"x": 0.25, "y": 0.75}, {}, {"y": 1.0}]
    got = lm(input_ids=ids, adapter_weights=mixes).logits
    pool = AdapterPool(dirs)
    with torch.no_grad():
        torch.testing.assert_close(got[1], base(input_ids=ids[1:2]).logits[0], rtol=1e-5, atol=1e-5)
        for row in (0, 2):
            oracle = peft_weighted_model(copy.deepcopy(base), pool, mixes[row])
            torch.testing.assert_close(got[row:row + 1], oracle(input_ids=ids[row:row + 1]).logits,
                                       rtol=1e-4, atol=1e-4)


def test_adapters_registered_by_name(tmp_path):
    from engine.registry import load_config_dir

    base = engine.load("tiny-mixtral", device="cpu")
    save_adapter(base, tmp_path / "pool" / "x", seed=31, targets=TARGETS)
    engine.register_adapter("y-from-code", save_adapter(base, tmp_path / "y", seed=32, targets=TARGETS))
    (tmp_path / "adapters.yaml").write_text("adapters:\n  - {name: x-from-yaml, path: pool/x}\n")
    load_config_dir(tmp_path)
    lm = engine.load("tiny-mixtral", device="cpu", adapters=["x-from-yaml", "y-from-code"])
    assert sorted(lm.pool.names) == ["x-from-yaml", "y-from-code"]
    ids = torch.randint(3, base.config.vocab_size, (1, 5))
    with torch.no_grad():
        assert not torch.allclose(lm(input_ids=ids, adapter_weights=[{"x-from-yaml": 1.0}]).logits,
                                  base(input_ids=ids).logits)
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        engine.load("tiny-mixtral", device="cpu", adapters=["nope"])

"""Pools as people have them: ranks 4, 8 and 16, different target modules, rank_pattern, alpha_pattern and
rsLoRA in one batch. Every row equals PEFT with that row's adapters active (each rescaled by its weight), on a
dense Llama, a dense Qwen2 and Mixtral; DoRA and embedding LoRA are refused with the adapter and field named."""
import copy

import pytest
import torch

from engine.lora import AdapterError, AdapterPool, attach_adapters
from tessera_kernels import triton_available

from lora_helpers import peft_mixture_logits, save_adapter, tiny_llama, tiny_mixtral, tiny_qwen2

MIXES = [{"r4": 0.6, "r8": 0.3, "r16": 0.1}, {}, {"r16": 1.0}, {"r8": 0.5, "pat": 0.5}, {"r4": 1.0, "pat": -0.5}]


def _pool_folders(model, root, mlp_targets):
    return {
        "r4": save_adapter(model, root / "r4", seed=1, r=4, targets=("q_proj", "v_proj")),
        "r8": save_adapter(model, root / "r8", seed=2, r=8, alpha=16.0, targets=("k_proj", "o_proj"), rslora=True),
        "r16": save_adapter(model, root / "r16", seed=3, r=16, alpha=8.0, targets=("q_proj", *mlp_targets)),
        "pat": save_adapter(model, root / "pat", seed=4, r=4, alpha=8.0, targets=("v_proj", "o_proj"),
                            rank_pattern={"o_proj": 8}, alpha_pattern={"layers.1.self_attn.v_proj": 2.0}),
    }


TRITON = pytest.mark.skipif(not triton_available("cpu"), reason="no interpreter")


@pytest.mark.parametrize("build,mlp,backend", [
    (tiny_llama, ("gate_proj", "down_proj"), "torch"), (tiny_qwen2, ("up_proj",), "torch"), (tiny_mixtral, (), "torch"),
    pytest.param(tiny_llama, ("gate_proj", "down_proj"), "triton", marks=TRITON),
], ids=["llama", "qwen2", "mixtral", "llama-triton"])
def test_mixed_ranks_and_targets_match_peft_per_row(build, mlp, backend, tmp_path):
    model = build()
    folders = _pool_folders(model, tmp_path, mlp)
    pool = AdapterPool(folders)
    assert pool.rank == 16 and pool.module_ranks()["model.layers.0.self_attn.o_proj"] == 8
    pat = pool.spec("pat").modules
    assert pat["model.layers.1.self_attn.v_proj"].scale == pytest.approx(2.0 / 4)
    assert pat["model.layers.0.self_attn.o_proj"].rank == 8 and pat["model.layers.0.self_attn.v_proj"].scale == 2.0
    assert pool.spec("r8").modules["model.layers.0.self_attn.k_proj"].scale == pytest.approx(16.0 / 8 ** 0.5)
    ids = torch.randint(3, 96, (len(MIXES), 6))
    lm = attach_adapters(copy.deepcopy(model), pool, backend=backend)
    got = lm(input_ids=ids, adapter_weights=MIXES).logits
    for row, mix in enumerate(MIXES):
        expected = peft_mixture_logits(model, mix, folders, tmp_path, ids[row:row + 1])
        torch.testing.assert_close(got[row:row + 1], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("targets,tol", [(("k_proj", "up_proj"), 0.0), (("q_proj", "up_proj"), 1e-6)],
                         ids=["absent-modules", "padded-rank"])
def test_padding_and_absent_modules_add_zeros(targets, tol, tmp_path):
    """A rank-4 adapter alone equals itself in a pool with a rank-16 adapter: modules it lacks add exact zeros
    (bit-identical); a rank padded with zeros gives the same sums (BLAS may block a longer one differently)."""
    model = tiny_llama()
    small = {"r4": save_adapter(model, tmp_path / "r4", seed=1, r=4)}
    wide = {**small, "r16": save_adapter(model, tmp_path / "r16", seed=3, r=16, targets=targets)}
    ids = torch.randint(3, 96, (2, 5))
    mixes = [{"r4": 0.7}, {}]
    alone = attach_adapters(copy.deepcopy(model), small, backend="torch")(input_ids=ids, adapter_weights=mixes)
    mixed = attach_adapters(copy.deepcopy(model), wide, backend="torch")(input_ids=ids, adapter_weights=mixes)
    torch.testing.assert_close(mixed.logits, alone.logits, rtol=tol, atol=tol)


@pytest.mark.parametrize("field,config,message", [
    ("use_dora", {"use_dora": True}, "field use_dora=True is refused"),
    ("embedding", {"targets": ("embed_tokens", "q_proj")}, "embedding LoRA"),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, "field modules_to_save"),
])
def test_dora_and_embedding_lora_are_refused_by_name(field, config, message, tmp_path):
    model = tiny_llama()
    folder = save_adapter(model, tmp_path / field, seed=5, **config)
    pool = AdapterPool()
    with pytest.raises(AdapterError, match=f"adapter 'bad': .*{message}"):
        pool.add("bad", folder)
    assert len(pool) == 0


@pytest.mark.parametrize("build,mlp", [(tiny_llama, ("gate_proj", "down_proj")), (tiny_qwen2, ("up_proj",))],
                         ids=["llama", "qwen2"])
def test_dense_models_loaded_by_engine_mix_a_mixed_pool_like_peft(build, mlp, tmp_path):
    """The same mixed pool on dense checkpoints saved by transformers and loaded with engine.load."""
    import engine

    model = build()
    model.save_pretrained(tmp_path / "base")
    folders = _pool_folders(model, tmp_path, mlp)
    lm = engine.load(tmp_path / "base", device="cpu", adapters=folders,
                     adapter_options={"base_model": model.config._name_or_path, "backend": "torch"})
    ids = torch.randint(3, 96, (len(MIXES), 6))
    got = lm(input_ids=ids, adapter_weights=MIXES).logits
    for row, mix in enumerate(MIXES):
        expected = peft_mixture_logits(model, mix, folders, tmp_path, ids[row:row + 1])
        torch.testing.assert_close(got[row:row + 1], expected, rtol=1e-4, atol=1e-4)

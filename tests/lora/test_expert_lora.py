"""LoRA on stacked MoE expert parameters (PEFT target_parameters): every row of a mixed batch equals PEFT with
that row's adapters active (rescaled by the row's weights), on Mixtral and Qwen3-MoE; the expert path equals
its token-by-token reference, and MoEShard's FFN slices and expert parallelism's expert ranges of it sum to
the whole (the distributed runs themselves: test_expert_lora_ranks.py)."""
import copy

import pytest
import torch

from engine.lora import AdapterPool, attach_adapters
from engine.lora.experts import ExpertLoRA, expert_lora_reference
from engine.moe.experts import ExpertWeights, run_experts
from tessera_kernels import triton_available

from lora_helpers import peft_mixture_logits, save_adapter, tiny_mixtral, tiny_qwen3_moe

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MIXES = [{"a": 1.0}, {"b": 0.6, "a": 0.4}, {}, {"c": 1.0}, {"b": 0.5, "c": 0.5}]


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen3_moe], ids=["mixtral", "qwen3_moe"])
def test_expert_lora_matches_peft_per_row(build, tmp_path):
    model = build()
    folders = {
        "a": save_adapter(model, tmp_path / "a", seed=1, r=4, targets=("q_proj",), target_parameters=EXPERTS),
        "b": save_adapter(model, tmp_path / "b", seed=2, r=8, alpha=6.0, targets=("v_proj",), rslora=True,
                          target_parameters=EXPERTS),
        "c": save_adapter(model, tmp_path / "c", seed=3, r=16, targets=("k_proj", "o_proj")),
    }
    pool = AdapterPool(folders)
    assert set(pool.spec("a").experts) == {f"model.layers.{i}.{p}" for i in range(2) for p in EXPERTS}
    assert pool.spec("a").experts["model.layers.0.mlp.experts.gate_up_proj"].num_experts == 4
    ids = torch.randint(3, 96, (len(MIXES), 6))
    lm = attach_adapters(copy.deepcopy(model), pool, backend="torch")
    got = lm(input_ids=ids, adapter_weights=MIXES).logits
    for row, mix in enumerate(MIXES):
        expected = peft_mixture_logits(model, mix, folders, tmp_path, ids[row:row + 1])
        torch.testing.assert_close(got[row:row + 1], expected, rtol=1e-4, atol=1e-4)


def _random_lora(num_tokens, experts, ffn, hidden, slots=3, rank=4, k=2, backend="torch"):
    def pair(d_in, d_out):
        return (torch.randn(slots, experts, rank, d_in) * 0.3, torch.randn(slots, experts, d_out, rank) * 0.3,
                torch.rand(slots) + 0.5)

    token_slots = torch.randint(-1, slots, (num_tokens, k), dtype=torch.int32)
    token_weights = torch.rand(num_tokens, k)
    return ExpertLoRA(pair(hidden, 2 * ffn), pair(ffn, hidden), lambda t: (token_slots, token_weights), backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available("cpu"), reason="no interpreter"))])
def test_expert_path_matches_reference_and_slices_sum_to_the_whole(backend):
    torch.manual_seed(0)
    tokens, experts, ffn, hidden = 9, 4, 12, 8
    w13 = torch.randn(experts, 2 * ffn, hidden) * 0.3
    base = ExpertWeights(w13[:, :ffn], torch.randn(experts, hidden, ffn) * 0.3, w13[:, ffn:], "silu", w13=w13)
    x = torch.randn(tokens, hidden)
    topk_ids = torch.randint(0, experts, (tokens, 2))
    topk_ids[0, 1] = experts  # a pair computed elsewhere (dropped or another rank's)
    topk_weights = torch.rand(tokens, 2)
    lora = _random_lora(tokens, experts, ffn, hidden, backend=backend)
    weights = ExpertWeights(base.w1, base.w2, base.w3, "silu", lora=lora)
    full = run_experts(x, topk_ids, topk_weights, weights, "torch")
    torch.testing.assert_close(full, expert_lora_reference(x, topk_ids, topk_weights, weights, lora),
                               rtol=1e-5, atol=1e-5)
    parts = sum(run_experts(x, topk_ids, topk_weights, weights.slice(a, b), "torch") for a, b in [(0, 5), (5, 12)])
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)
    # Expert parallelism: whole experts [start, stop) per rank, ids local to the rank, the stacks shared.
    owned = 0
    for start, stop in [(0, 1), (1, 4)]:
        part = ExpertWeights(base.w1[start:stop], base.w2[start:stop], base.w3[start:stop], "silu",
                             lora=lora.experts(start, stop))
        local = torch.where((topk_ids >= start) & (topk_ids < stop), topk_ids - start, stop - start)
        got = run_experts(x, local, topk_weights, part, "torch")
        torch.testing.assert_close(got, expert_lora_reference(x, local, topk_weights, part, part.lora),
                                   rtol=1e-5, atol=1e-5)
        owned = owned + got
    torch.testing.assert_close(owned, full, rtol=1e-5, atol=1e-5)
    no_lora = run_experts(x, topk_ids, topk_weights, base, "reference")
    assert not torch.allclose(no_lora, full)


def test_an_adapter_of_single_switch_experts_is_refused_by_name(tmp_path):
    """PEFT on Hugging Face's Switch adapts each expert's own `wi`/`wo` (`experts.expert_3.wi`); tessera runs the
    experts stacked, so such an adapter is refused with an error that says so, not loaded without its expert
    layers, and not blamed on a wrong base model."""
    import engine
    from peft import LoraConfig, get_peft_model
    from transformers import SwitchTransformersEncoderModel

    from engine.lora import AdapterError

    model = engine.load("tiny-switch-encoder", device="cpu")
    torch.manual_seed(0)
    hf = get_peft_model(SwitchTransformersEncoderModel(model.config), LoraConfig(r=2, target_modules=["wi", "wo"]))
    hf.save_pretrained(tmp_path / "experts")
    with pytest.raises(AdapterError, match=r"experts\.expert_\d+\.w[io]'.*stacked expert weights.*not supported"):
        attach_adapters(model, {"experts": str(tmp_path / "experts")})

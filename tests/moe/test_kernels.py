"""Each MoE kernel against its plain-PyTorch reference, through Triton's interpreter on CPU (or on a GPU)."""
import pytest
import torch

from tessera_kernels.combine import combine_topk, combine_topk_reference
from tessera_kernels.expert_gemm import expert_down, expert_down_reference, expert_up, expert_up_reference
from tessera_kernels.fused_moe import fused_experts, fused_experts_reference
from tessera_kernels.moe_align import moe_align, moe_align_reference
from tessera_kernels.moe_configs import moe_kernel_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(num_experts, ffn, hidden, gated, dtype=torch.float32):
    def rand(*shape, scale):
        return (torch.randn(*shape) * scale).to(dtype).to(DEVICE)

    w1 = rand(num_experts, ffn, hidden, scale=hidden ** -0.5)
    w3 = rand(num_experts, ffn, hidden, scale=hidden ** -0.5) if gated else None
    w2 = rand(num_experts, hidden, ffn, scale=ffn ** -0.5)
    return w1, w2, w3


def _assert_aligned_equal(got, want):
    for field in ("sorted_pair_ids", "block_expert_ids", "num_padded", "counts"):
        assert torch.equal(getattr(got, field).long().cpu(), getattr(want, field).long().cpu()), field


@pytest.mark.parametrize("num_pairs,num_experts,block_m", [(1, 4, 16), (37, 5, 4), (200, 8, 16), (64, 1, 16)])
def test_align_matches_reference(num_pairs, num_experts, block_m):
    ids = torch.randint(0, num_experts, (num_pairs,), device=DEVICE)
    _assert_aligned_equal(moe_align(ids, num_experts, block_m), moe_align_reference(ids, num_experts, block_m))


def test_align_groups_pairs_by_expert_in_order_and_skips_out_of_range_ids():
    ids = torch.tensor([2, 0, 2, 5, -1, 0, 2], device=DEVICE)  # 5 and -1 are not computed here
    aligned = moe_align(ids, num_experts=3, block_m=4)
    sentinel = ids.numel()
    assert aligned.sorted_pair_ids[:8].tolist() == [1, 5, sentinel, sentinel, 0, 2, 6, sentinel]
    assert aligned.block_expert_ids.tolist()[:2] == [0, 2]
    assert set(aligned.block_expert_ids.tolist()[2:]) == {-1}
    assert aligned.num_padded.item() == 8 and aligned.counts.tolist() == [2, 0, 3]


def test_align_all_pairs_on_one_expert():
    ids = torch.full((50,), 3, device=DEVICE)
    aligned = moe_align(ids, 8, 16)
    assert aligned.counts.tolist() == [0, 0, 0, 50, 0, 0, 0, 0]
    assert aligned.num_padded.item() == 64
    _assert_aligned_equal(aligned, moe_align_reference(ids, 8, 16))


@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "relu"), (False, "gelu"), (True, "gelu_tanh")])
@pytest.mark.parametrize("ffn", [40, 13])  # not a multiple of the block size; an odd slice width
def test_expert_gemms_match_reference(gated, activation, ffn):
    num_tokens, top_k, hidden, num_experts = 23, 2, 48, 5
    x = torch.randn(num_tokens, hidden, device=DEVICE)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), device=DEVICE)
    ids[0, 1] = num_experts  # dropped pair
    w1, w2, w3 = _weights(num_experts, ffn, hidden, gated)
    config = moe_kernel_config(num_tokens, top_k, num_experts, ffn, hidden, x.dtype, DEVICE)
    aligned = moe_align(ids, num_experts, config["BLOCK_M"])
    inter = expert_up(x, aligned, top_k, w1, w3, activation, config)
    want_inter = expert_up_reference(x, ids, top_k, w1, w3, activation)
    valid = (ids.reshape(-1) < num_experts)
    torch.testing.assert_close(inter[valid], want_inter[valid], rtol=1e-5, atol=1e-5)
    weights = torch.rand(ids.numel(), device=DEVICE)
    out = expert_down(inter, aligned, w2, weights, config)
    torch.testing.assert_close(out[valid], expert_down_reference(inter, ids, w2, weights)[valid],
                               rtol=1e-5, atol=1e-5)


def test_combine_sums_choices_and_ignores_out_of_range_pairs():
    ids = torch.tensor([[0, 1], [2, 9], [-1, 1]], device=DEVICE)
    pair_out = torch.randn(6, 20, device=DEVICE)
    pair_out[3] = float("nan")  # never written for a dropped pair: must not leak into the sum
    got = combine_topk(pair_out, ids, num_experts=3)
    torch.testing.assert_close(got, combine_topk_reference(pair_out, ids, 3))
    torch.testing.assert_close(got[1], pair_out[2])


@pytest.mark.parametrize("case", ["random", "one_token", "no_tokens", "one_expert", "empty_experts"])
def test_fused_experts_edge_cases(case):
    num_tokens, top_k, hidden, ffn, num_experts = 29, 2, 32, 24, 6
    if case in ("one_token", "no_tokens"):  # no tokens: a rank whose batch is empty still joins the layer
        num_tokens = int(case == "one_token")
    x = torch.randn(num_tokens, hidden, device=DEVICE)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), device=DEVICE)
    if case == "one_expert":
        ids = torch.full_like(ids, 4)
        top_k = 1
        ids = ids[:, :1]
    if case == "empty_experts":
        ids = ids % 2 * 5  # only experts 0 and 5 get tokens
    weights = torch.rand(num_tokens, top_k, device=DEVICE)
    w1, w2, w3 = _weights(num_experts, ffn, hidden, gated=True)
    got = fused_experts(x, ids, weights, w1, w2, w3, "silu")
    torch.testing.assert_close(got, fused_experts_reference(x, ids, weights, w1, w2, w3, "silu"),
                               rtol=1e-5, atol=1e-5)


def test_slices_of_every_expert_sum_to_the_full_output():
    """What MoEShard relies on: columns [a, b) of w1/w3 and rows [a, b) of w2 give an exact partial output."""
    num_tokens, top_k, hidden, ffn, num_experts = 17, 2, 32, 37, 4
    x = torch.randn(num_tokens, hidden, device=DEVICE)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), device=DEVICE)
    weights = torch.rand(num_tokens, top_k, device=DEVICE)
    w1, w2, w3 = _weights(num_experts, ffn, hidden, gated=True)
    full = fused_experts(x, ids, weights, w1, w2, w3, "silu")
    bounds = [0, 13, 26, 37]  # uneven: 13 + 13 + 11
    partial = sum(fused_experts(x, ids, weights, w1[:, a:b], w2[:, :, a:b], w3[:, a:b], "silu", torch.float32)
                  for a, b in zip(bounds, bounds[1:]))
    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)


def test_bf16_within_documented_bound():
    """bf16: the intermediate is rounded to bf16 between the GEMMs, as Hugging Face does; bound 2e-2 × max."""
    num_tokens, top_k, hidden, ffn, num_experts = 21, 2, 32, 40, 4
    x = torch.randn(num_tokens, hidden, device=DEVICE).bfloat16()
    ids = torch.randint(0, num_experts, (num_tokens, top_k), device=DEVICE)
    weights = torch.rand(num_tokens, top_k, device=DEVICE)
    w1, w2, w3 = _weights(num_experts, ffn, hidden, gated=True, dtype=torch.bfloat16)
    got = fused_experts(x, ids, weights, w1, w2, w3, "silu").float()
    want = fused_experts_reference(x, ids, weights, w1, w2, w3, "silu").float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.cuda
def test_fused_experts_cuda_large_shapes_match_reference():
    num_tokens, top_k, hidden, ffn, num_experts = 4096, 2, 768, 3072, 8
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), device="cuda")
    weights = torch.rand(num_tokens, top_k, device="cuda")
    w1, w2, w3 = _weights(num_experts, ffn, hidden, gated=True, dtype=torch.bfloat16)
    got = fused_experts(x, ids, weights, w1, w2, w3, "silu").float()
    want = fused_experts_reference(x, ids, weights, w1, w2, w3, "silu").float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_expert_biases_and_their_slices(activation):
    """BERT-style experts carry biases: the first is sliced with the columns, the second added by one slice."""
    num_tokens, top_k, hidden, ffn, num_experts = 19, 2, 32, 30, 3
    x = torch.randn(num_tokens, hidden, device=DEVICE)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), device=DEVICE)
    weights = torch.rand(num_tokens, top_k, device=DEVICE)
    w1, w2, _ = _weights(num_experts, ffn, hidden, gated=False)
    b1, b2 = torch.randn(num_experts, ffn, device=DEVICE), torch.randn(num_experts, hidden, device=DEVICE)
    want = fused_experts_reference(x, ids, weights, w1, w2, None, activation, b1=b1, b2=b2)
    got = fused_experts(x, ids, weights, w1, w2, None, activation, b1=b1, b2=b2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    from engine.moe.experts import ExpertWeights, run_experts

    full = ExpertWeights(w1, w2, None, activation, b1=b1, b2=b2)
    torch.testing.assert_close(run_experts(x, ids, weights, full, "torch"), want, rtol=1e-5, atol=1e-5)
    partial = sum(run_experts(x, ids, weights, full.slice(a, b), "triton") for a, b in [(0, 11), (11, 30)])
    torch.testing.assert_close(partial, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["concatenated", "interleaved", "slice"])
def test_gate_up_layouts_run_as_one_gemm_without_copies(layout):
    """w1 and w3 as views of one tensor in every layout the families store (no merge copy), and as a column
    slice of a concatenated one (MoEShard's view of its rank's part)."""
    from tessera_kernels.expert_gemm import merged_gate_up

    num_tokens, top_k, hidden, ffn, num_experts = 13, 2, 32, 24, 3
    x = torch.randn(num_tokens, hidden, device=DEVICE)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), device=DEVICE)
    weights = torch.rand(num_tokens, top_k, device=DEVICE)
    gate_up = torch.randn(num_experts, 2 * ffn, hidden, device=DEVICE) * hidden ** -0.5
    w2 = torch.randn(num_experts, hidden, ffn, device=DEVICE) * ffn ** -0.5
    if layout == "interleaved":
        w1, w3 = gate_up[:, 0::2], gate_up[:, 1::2]
    else:
        w1, w3 = gate_up[:, :ffn], gate_up[:, ffn:]
    if layout == "slice":
        w1, w3, w2 = w1[:, 5:17], w3[:, 5:17], w2[:, :, 5:17]
    view, offset = merged_gate_up(w1, w3)
    assert view.data_ptr() == w1.data_ptr() and offset == w3.storage_offset() - w1.storage_offset()
    got = fused_experts(x, ids, weights, w1, w2, w3, "silu")
    torch.testing.assert_close(got, fused_experts_reference(x, ids, weights, w1, w2, w3, "silu"),
                               rtol=1e-5, atol=1e-5)


def test_expert_weights_store_gate_and_up_merged():
    from engine.moe.experts import ExpertWeights

    w1, w3, w2 = torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.randn(2, 4, 6)
    weights = ExpertWeights(w1, w2, w3, "silu")
    assert weights.w13.shape == (2, 12, 4) and weights.w1._base is weights.w13 and weights.w3._base is weights.w13
    torch.testing.assert_close(weights.w1, w1)
    torch.testing.assert_close(weights.w3, w3)
    part = weights.slice(2, 5)  # each rank's part: its columns of gate and of up, still one tensor
    torch.testing.assert_close(part.w1, w1[:, 2:5])
    torch.testing.assert_close(part.w3, w3[:, 2:5])
    assert part.w1._base is part.w3._base


def test_tuned_config_files_are_used_for_their_device_and_shape(tmp_path):
    import json

    from tessera_kernels.moe_configs import config_file_name, config_for, safe_config

    tuned = {"16": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=3),
             "4096": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=4)}
    name = "NVIDIA H100 80GB HBM3"
    path = tmp_path / config_file_name(name, 8, 1792, 4096, torch.bfloat16)
    path.write_text(json.dumps({"device": name, "capability": 90, "configs": tuned}))
    assert config_for((name, 90), 1, 2, 8, 1792, 4096, torch.bfloat16, tmp_path) == tuned["16"]
    assert config_for((name, 90), 3000, 2, 8, 1792, 4096, torch.bfloat16, tmp_path) == tuned["4096"]
    # another shape, dtype or device: the safe table of the device's generation
    assert config_for((name, 90), 1, 2, 8, 3584, 4096, torch.bfloat16, tmp_path) == safe_config(90, 0.25, torch.bfloat16)
    assert config_for(("NVIDIA L4", 89), 1, 2, 8, 1792, 4096, torch.bfloat16, tmp_path) == safe_config(
        89, 0.25, torch.bfloat16)
    bad = tmp_path / config_file_name(name, 8, 1792, 4096, torch.float16)
    bad.write_text(json.dumps({"configs": {"1": {"BLOCK_M": 16}}}))
    with pytest.raises(ValueError, match="lacks"):
        config_for((name, 90), 1, 2, 8, 1792, 4096, torch.float16, tmp_path)


def test_tuner_lists_the_registry_shapes_and_refuses_without_a_gpu(capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "tune_moe.py"
    spec = importlib.util.spec_from_file_location("tune_moe", path)
    tune_moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune_moe)
    assert tune_moe.main(["--dry-run", "--families", "mixtral-8x7b", "--slices", "1", "8"]) == 0
    out = capsys.readouterr().out
    assert "E=8,N=14336,K=4096" in out and "E=8,N=1792,K=4096" in out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA GPU"):
        tune_moe.main(["--families", "mixtral-8x7b"])


def test_grouped_program_order_reaches_every_tile():
    """GPU configs walk row blocks in groups (L2 reuse); a last, partial group and groups taller than the grid
    must still cover every (row block, column block) tile exactly once."""
    num_tokens, top_k, hidden, ffn, num_experts = 40, 2, 48, 72, 3  # 8 row blocks at most: groups 3, 3, 2
    x = torch.randn(num_tokens, hidden, device=DEVICE)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), device=DEVICE)
    weights = torch.rand(num_tokens, top_k, device=DEVICE)
    w1, w2, w3 = _weights(num_experts, ffn, hidden, gated=True)
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_SIZE_M=3, num_warps=4, num_stages=1)
    got = fused_experts(x, ids, weights, w1, w2, w3, "silu", config=config)
    torch.testing.assert_close(got, fused_experts_reference(x, ids, weights, w1, w2, w3, "silu"),
                               rtol=1e-5, atol=1e-5)

"""The one-launch router (`tessera_kernels.routing`) against the torch router it replaces on the triton backend."""
import pytest
import torch

from engine.moe.router import RouterSpec, route, router_logits
from tessera_kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available("cpu"), reason="needs Triton (TRITON_INTERPRET=1 on CPU)")

# (kind, experts, top_k, normalize, weights_in_fp32, bias): Switch, Mixtral, Qwen2-MoE (no renormalisation),
# Qwen3-MoE/OLMoE-like (many experts, top-8, bf16 weights), a router with a bias.
SPECS = [("switch", 8, 1, False, True, False), ("softmax_topk", 8, 2, True, True, False),
         ("softmax_topk", 60, 4, False, True, False), ("softmax_topk", 128, 8, True, False, False),
         ("softmax_topk", 16, 2, True, True, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind, experts, top_k, normalize, fp32_weights, with_bias", SPECS)
@pytest.mark.parametrize("tokens", [1, 37])
def test_fused_route_matches_the_torch_router(kind, experts, top_k, normalize, fp32_weights, with_bias, dtype,
                                              tokens):
    from tessera_kernels.routing import fused_route

    spec = RouterSpec(kind, experts, top_k, normalize, fp32_weights)
    g = torch.Generator().manual_seed(experts + tokens)
    hidden_size = 96  # not a multiple of the kernel's hidden block: the tail is masked
    x = torch.randn(tokens, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(experts, hidden_size, generator=g) * 0.3).to(dtype)
    bias = torch.randn(experts, generator=g).to(dtype) if with_bias else None
    logits = router_logits(spec, x, weight, bias)
    want_ids, want_weights = route(spec, logits, x.dtype)
    counts = torch.zeros(experts + 1, dtype=torch.int64)
    flag = torch.zeros(1, dtype=torch.int32)
    weights_dtype = dtype if kind == "switch" or not fp32_weights else torch.float32
    ids, weights = fused_route(x, weight, bias, top_k, switch=kind == "switch", normalize=normalize,
                               weights_dtype=weights_dtype, bad_flag=flag, counts=counts)
    assert weights.dtype == want_weights.dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a few ulps at 0.5
    if dtype == torch.float32:
        assert torch.equal(ids, want_ids)
    else:  # bf16 logits tie often, and one rounding step apart may swap near-ties: the picks must be as good
        probs = torch.softmax(logits.float(), dim=-1)
        assert torch.allclose(probs.gather(1, ids.long()), probs.gather(1, want_ids), atol=tolerance, rtol=tolerance)
        assert (ids == want_ids).float().mean() > 0.9
    assert torch.allclose(weights.float(), want_weights.float(), atol=tolerance, rtol=tolerance)
    assert torch.equal(counts[:experts], torch.bincount(ids.long().flatten(), minlength=experts))
    assert flag.item() == 0


def test_fused_route_flags_non_finite_logits_without_raising():
    from tessera_kernels.routing import fused_route

    x = torch.randn(5, 32)
    x[3, 7] = float("nan")
    flag = torch.zeros(1, dtype=torch.int32)
    fused_route(x, torch.randn(8, 32), None, 2, switch=False, normalize=True, weights_dtype=torch.float32,
                bad_flag=flag)
    assert flag.item() == 1

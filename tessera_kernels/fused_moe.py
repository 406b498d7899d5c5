"""Launcher for the fused MoE expert computation: align, first GEMM (gate and up together) + activation, second
GEMM + routing weight, combine. Four launches per layer at decode sizes (align takes a second one for large
batches), whatever the number of experts; no host synchronisation, no torch ops that launch kernels, and every
grid and buffer sized from shapes alone (so the layer can be captured in a CUDA graph).

The weights may be a slice of every expert (see `tessera_kernels.expert_gemm`): the result is then this slice's exact
partial output, and partial outputs of all slices sum to the full one.
"""
from __future__ import annotations

import torch

from tessera_kernels.combine import combine_topk, combine_topk_reference
from tessera_kernels.expert_gemm import expert_down, expert_down_reference, expert_up, expert_up_reference
from tessera_kernels.moe_align import align_launches, moe_align
from tessera_kernels.moe_configs import device_label, moe_kernel_config


def fused_experts(
    hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor | None,
    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None = None, activation: str = "silu",
    out_dtype: torch.dtype | None = None, b1: torch.Tensor | None = None, b2: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """`hidden (T, H)`, `topk_ids (T, k)` with ids outside `[0, E)` meaning "not computed here",
    `topk_weights (T, k)` or None, optional biases `b1 (E, F_s)` and `b2 (E, H)`; returns `(T, H)` in
    `out_dtype` (default: hidden's dtype). Gated experts are fastest with `w3` stored beside `w1` in one tensor
    (see `tessera_kernels.expert_gemm.merged_gate_up`); `config` overrides the block configuration (the tuner's)."""
    num_tokens, top_k = topk_ids.shape
    num_experts, ffn, hidden_size = w1.shape
    if config is None:
        config = moe_kernel_config(num_tokens, top_k, num_experts, ffn, hidden_size, hidden.dtype, hidden.device)
    stage = "align"
    try:
        aligned = moe_align(topk_ids, num_experts, config["BLOCK_M"])
        stage = "expert_up"
        inter = expert_up(hidden, aligned, top_k, w1, w3, activation, config, b1)
        pair_weights = topk_weights.reshape(-1) if topk_weights is not None else None
        stage = "expert_down"
        pair_out = expert_down(inter, aligned, w2, pair_weights, config, b2=b2)
        stage = "combine"
        return combine_topk(pair_out, topk_ids, num_experts, out_dtype or hidden.dtype)
    except _triton_errors() as error:
        raise RuntimeError(
            f"MoE kernel {stage} failed on {device_label(hidden.device)} with {config} "
            f"(E={num_experts}, F_s={ffn}, H={hidden_size}, {hidden.dtype}, {num_tokens} tokens x top-{top_k}): "
            f"{error}") from error


def _triton_errors() -> tuple[type[Exception], ...]:
    """What Triton raises when a kernel cannot compile or launch on this device (not bad input)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    return CompilationError, OutOfResources


def fused_experts_launches(num_tokens: int, top_k: int, num_experts: int) -> int:
    """Kernel launches of one `fused_experts` call with merged gate/up weights: align, up, down, combine."""
    return align_launches(num_tokens * top_k, num_experts) + 3


def fused_experts_reference(hidden, topk_ids, topk_weights, w1, w2, w3=None, activation="silu", out_dtype=None,
                            b1=None, b2=None):
    """The plain-PyTorch definition of the experts, which every backend (and the expert-LoRA path) must meet:
    the same three steps as `fused_experts`, each step's reference, all in fp32."""
    inter = expert_up_reference(hidden, topk_ids, topk_ids.shape[1], w1, w3, activation, b1, torch.float32)
    pair_weights = topk_weights.reshape(-1) if topk_weights is not None else None
    pair_out = expert_down_reference(inter, topk_ids, w2, pair_weights, b2, torch.float32)
    return combine_topk_reference(pair_out, topk_ids, w1.shape[0], out_dtype or hidden.dtype)

"""Expert weights (whole or a slice of every expert) and the backends that run them.

A backend takes token rows, each token's expert ids and routing weights, and returns the weighted sum of its
experts' outputs. Expert ids outside `[0, E)` mean "not computed here" (dropped by a capacity limit, or held by
another rank) and contribute zero. All backends give the same answer; they differ in speed and where they run:

- `triton`: our fused kernels (`tessera_kernels.fused_moe`), four launches at decode sizes (align, two GEMMs, combine;
  five for large batches; the MoE block adds one for its fused router), no host synchronisation. CUDA, or CPU
  through Triton's interpreter (slow, for tests).
- `torch`: pairs sorted by expert, then `torch._grouped_mm` (one call per GEMM, no host synchronisation) on
  Hopper GPUs in bf16, else the reference below (one fp32 matmul per expert that has rows; it reads the
  per-expert counts on the host: a synchronisation on CUDA, free on CPU). The fast CPU path.
- `reference`: `tessera_kernels.fused_moe.fused_experts_reference`, the one plain-PyTorch definition of the experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera_kernels import triton_available
from tessera_kernels.expert_gemm import ACTIVATIONS, apply_activation_reference, shares_gate_up_storage
from tessera_kernels.fused_moe import fused_experts_reference

BACKENDS = ("triton", "torch", "reference", "eager")

# Hugging Face activation names -> our kernel activation names.
HF_ACTIVATIONS = {
    "relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu",
}


def activation_from_hf(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"unsupported expert activation {name!r}; tessera supports {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


@dataclass
class ExpertWeights:
    """`w1 (E, F_s, H)`, optional `w3 (E, F_s, H)` (gated experts: act(x w1ᵀ) · x w3ᵀ), `w2 (E, H, F_s)`.

    Gated experts keep gate and up in one tensor, so the kernels run both as one GEMM: `w1` and `w3` are views
    of it (`[w1; w3]` concatenated as `w13 (E, 2F_s, H)`, Hugging Face's `gate_up_proj` in any of its layouts,
    or a column slice of those). Given apart, they are merged into `w13` once, here.

    `F_s` may be a slice `[start, stop)` of the full hidden FFN width: columns of every expert's first matrix
    and the same rows of its second. The partial outputs of slices that cover `[0, F)` sum to the full output;
    the second bias goes with the slice that starts at 0.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor | None
    activation: str
    w13: torch.Tensor | None = None  # [w1; w3] as one (E, 2F_s, H) tensor when stored so: one GEMM for both
    b1: torch.Tensor | None = None  # (E, F_s): bias of the first matrix, sliced with its columns
    b2: torch.Tensor | None = None  # (E, H): bias of the second matrix, added by exactly one slice
    lora: object | None = None  # engine.lora.experts.ExpertLoRA: the batch's expert adapters, run by it

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        e, f, h = self.w1.shape
        if self.w2.shape != (e, h, f):
            raise ValueError(f"expert matrices disagree: w1 {tuple(self.w1.shape)} needs w2 {(e, h, f)}, "
                             f"got {tuple(self.w2.shape)}")
        if self.w3 is not None and self.w3.shape != self.w1.shape:
            raise ValueError(f"gated experts need w3 shaped like w1 {tuple(self.w1.shape)}, got {tuple(self.w3.shape)}")
        if self.w3 is not None and not shares_gate_up_storage(self.w1, self.w3):
            self.w13 = torch.cat([self.w1, self.w3], dim=1)
            self.w1, self.w3 = self.w13[:, :f], self.w13[:, f:]

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w1.shape[2]

    @property
    def ffn_width(self) -> int:
        return self.w1.shape[1]

    def slice(self, start: int, stop: int) -> "ExpertWeights":
        """Views (no copies) of FFN columns `[start, stop)` of every expert."""
        return ExpertWeights(  # views into the same merged tensor, but no longer one [w1; w3] block: no w13
            self.w1[:, start:stop], self.w2[:, :, start:stop],
            None if self.w3 is None else self.w3[:, start:stop], self.activation,
            b1=None if self.b1 is None else self.b1[:, start:stop],
            b2=self.b2 if start == 0 else None,
            lora=None if self.lora is None else self.lora.slice(start, stop, self.ffn_width),
        )


def default_backend(device) -> str:
    """Triton on CUDA, torch on CPU."""
    return "triton" if torch.device(device).type == "cuda" and triton_available(device) else "torch"


def check_backend(backend: str, device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton" and not triton_available(device):
        raise RuntimeError(
            f"backend 'triton' is unavailable on {torch.device(device)}: Triton runs on CUDA devices, or on CPU "
            "only with TRITON_INTERPRET=1 set before import (slow, for tests); use backend='torch' on CPU"
        )
    return backend


def run_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor | None,
                weights: ExpertWeights, backend: str, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`hidden (T, H)`, `topk_ids (T, k)`, `topk_weights (T, k)` → `(T, H)`."""
    if weights.lora is not None:  # expert LoRA changes the expert computation itself: it runs the experts
        return weights.lora.run(hidden, topk_ids, topk_weights, weights, out_dtype)
    if backend == "triton":
        from tessera_kernels.fused_moe import fused_experts

        return fused_experts(hidden, topk_ids, topk_weights, weights.w1, weights.w2, weights.w3,
                             weights.activation, out_dtype, weights.b1, weights.b2)
    if backend == "torch" and _grouped_mm_works(hidden):
        return _grouped_mm_experts(hidden, topk_ids, topk_weights, weights, out_dtype)
    if backend in ("torch", "reference"):
        return fused_experts_reference(hidden, topk_ids, topk_weights, weights.w1, weights.w2, weights.w3,
                                       weights.activation, out_dtype, weights.b1, weights.b2)
    raise ValueError(f"backend {backend!r} does not run expert weights directly")


def _grouped_mm_works(x: torch.Tensor) -> bool:
    """torch's grouped GEMM where it is a real fused kernel (bf16 on Hopper). On CPU it is no faster than one
    matmul per expert, and reading the per-expert counts there costs no device synchronisation."""
    return (hasattr(torch, "_grouped_mm") and x.device.type == "cuda" and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def _grouped_mm_experts(hidden, topk_ids, topk_weights, weights: ExpertWeights, out_dtype):
    """Pairs sorted by expert, one grouped GEMM per projection; no host synchronisation."""
    top_k, num_experts = topk_ids.shape[1], weights.num_experts
    flat = topk_ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    # Out-of-range ids sort to the end and fall outside every expert's run, so they are never computed.
    slot = torch.where(valid, flat, num_experts)
    order = torch.argsort(slot, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    counts = counts.index_add_(0, slot, torch.ones_like(slot))[:num_experts]  # bincount would sync on CUDA
    pair_weights = None if topk_weights is None else topk_weights.reshape(-1)[order]
    sorted_experts, valid_sorted = flat[order].clamp(0, num_experts - 1), valid[order]
    rows = hidden[order // top_k]
    offsets = torch.cumsum(counts, 0).to(torch.int32)

    def grouped(a, b):
        return torch._grouped_mm(a, b.to(a.dtype).transpose(1, 2), offs=offsets)

    pre = grouped(rows, weights.w1)
    if weights.b1 is not None:
        pre = pre + weights.b1[sorted_experts]
    h = apply_activation_reference(pre, weights.activation)
    if weights.w3 is not None:
        h = h * grouped(rows, weights.w3)
    pair_out = grouped(h, weights.w2)
    if weights.b2 is not None:
        pair_out = pair_out + weights.b2[sorted_experts]
    # Rows past the last offset are left uninitialised by grouped_mm: mask them without reading offsets.
    pair_out = pair_out.masked_fill(~valid_sorted[:, None], 0)
    if pair_weights is not None:
        pair_out = pair_out * pair_weights[:, None]
    out = torch.empty_like(pair_out)
    out[order] = pair_out
    return out.view(-1, top_k, out.shape[-1]).sum(1).to(out_dtype or hidden.dtype)

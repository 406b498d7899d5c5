"""A linear layer that adds each batch row's own LoRA mixture to the base output.

All wrapped layers of a model share one `MixtureState`: the (slots, weights) of the current batch, set once per
forward/generate call by `LoRAModel`. With no state set, the layer is exactly the base layer. The routing
weights are per adapter; each module multiplies them by its own per-slot LoRA scale (rank_pattern,
alpha_pattern and rsLoRA make scales differ between modules, and a module an adapter lacks has scale 0).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.lora.cache import AdapterCache
from tessera_kernels.lora_mixture import lora_mixture
from tessera_kernels.lora_sgmv import BLOCK_M, group_pairs, lora_sgmv, row_token_slots


class MixtureState:
    """Per-batch routing tensors shared by every wrapped layer of one model."""

    def __init__(self, cache: AdapterCache, backend: str = "auto"):
        self.cache, self.backend = cache, backend
        self.slots: torch.Tensor | None = None  # [rows, K] int32, -1 = empty
        self.weights: torch.Tensor | None = None  # [rows, K] fp32 routing weights (0 where slot is -1)
        self._expanded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scaled: dict[tuple[str, int], torch.Tensor] = {}
        self.rows_seen: int | None = None  # batch rows of the MoE block running now (set by a forward hook)
        self.seq_lens: torch.Tensor | None = None  # packed batches: tokens of each row, back to back
        self._packed: tuple | None = None  # packed batches: (token slots, weights, grouping), shared by layers
        self.adapters: dict[str, int] = {}  # the batch's adapters -> their slots
        self.ranks = None  # engine.lora.expert_ranks.RankSlots on a distributed model

    def set(self, slots: torch.Tensor, weights: torch.Tensor, seq_lens: torch.Tensor | None = None,
            adapters: dict[str, int] | None = None) -> None:
        self.slots, self.weights, self.seq_lens, self._expanded, self._scaled = slots, weights, seq_lens, {}, {}
        self._packed = None
        self.adapters = dict(adapters or {})

    def clear(self) -> None:
        self.slots = self.weights = self.seq_lens = self._packed = None
        self._expanded, self._scaled, self.adapters = {}, {}, {}
        if self.ranks is not None:
            self.ranks.release()

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Token slots, token weights and their adapter grouping for a packed batch, built once per pass."""
        if self._packed is None:
            slots, weights = row_token_slots(self.slots, self.weights, self.seq_lens)
            self._packed = (slots, weights, group_pairs(slots, self.cache.capacity, BLOCK_M))
        return self._packed

    def token_routing(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, weights) [tokens, K] for a layer that sees the batch's rows flattened to tokens."""
        if self.seq_lens is not None:
            return row_token_slots(self.slots, self.weights, self.seq_lens)
        rows = self.rows_seen or self.slots.shape[0]
        if tokens % rows:
            raise ValueError(f"{tokens} tokens cannot be split into the batch's {rows} rows")
        return row_token_slots(*self.for_rows(rows), tokens // rows)

    def for_module(self, module: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, weights x this module's LoRA scale per slot) for `rows` rows."""
        slots, weights = self.for_rows(rows)
        key = (module, rows)
        if key not in self._scaled:
            self._scaled[key] = weights * self.cache.scales(module)[slots.clamp(min=0).long()]
        return slots, self._scaled[key]

    def for_rows(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing tensors for `rows` rows; generate() repeats each row for beams/return sequences."""
        base = self.slots.shape[0]
        if rows == base:
            return self.slots, self.weights
        if rows % base:
            raise ValueError(f"the layer sees {rows} rows but the batch was routed for {base}")
        if rows not in self._expanded:
            factor = rows // base
            self._expanded[rows] = (self.slots.repeat_interleave(factor, 0),
                                    self.weights.repeat_interleave(factor, 0))
        return self._expanded[rows]


class MixtureLoRALinear(nn.Linear):
    """y = base(x) + sum_k w[b, k] * s_k * B_k A_k x for the rows b of x ([rows, L, in] or [rows, in]).

    It takes over the base layer's own weight and bias parameters, so state-dict keys, devices and tied
    weights stay exactly those of the unwrapped model.
    """

    def __init__(self, base: nn.Linear, module: str, state: MixtureState):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.module, self.state = module, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        if self.state.slots is None or not self.state.cache.has(self.module):
            return y
        a_stack, b_stack = self.state.cache.stacks(self.module)
        y2 = y.reshape(-1, y.shape[-1])
        if self.state.seq_lens is not None:  # packed rows: the segment-grouped kernel, per token
            slots, weights, grouping = self.state.packed()
            weights = weights * self.state.cache.scales(self.module)[slots.clamp(min=0).long()]
            lora_sgmv(x.reshape(-1, x.shape[-1]), y2, a_stack, b_stack, slots, weights, self.state.backend,
                      grouping)
        else:
            slots, weights = self.state.for_module(self.module, x.shape[0])
            lora_mixture(x, y2, a_stack, b_stack, slots, weights, backend=self.state.backend)
        return y2.view(y.shape)

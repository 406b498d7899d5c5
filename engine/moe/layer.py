"""The MoE block that replaces each family's sparse-MLP module.

A block routes with its family's exact arithmetic (`engine.moe.router`) and hands the routed tokens to an
executor. The default executor runs all experts on this process with the chosen backend; the distributed
strategies install executors that shard experts across ranks, with the routing unchanged.

Family subclasses say where the weights live (`expert_weights`, `router_parameters`) and add anything beyond
routed experts (`extra_output`, e.g. Qwen2-MoE's gated shared expert). Weights are read from the module's
parameters at each call (views, no copies), so `.to()`, `load_state_dict` and sharded loading all stay valid.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.moe.experts import ExpertWeights, run_experts
from engine.moe.launch_errors import explain_launch_failure
from engine.moe.router import RouterSpec, route, router_logits


class RouterHealth:
    """Device-side flags, one per MoE block of a model, raised when a block sees non-finite router logits.

    Blocks only write to the device; the model checks once after its forward pass (one host synchronisation per
    pass, not one per layer). Flags are kept per device so a model split across devices still works.
    """

    def __init__(self, names: list[str]):
        self.names = names
        self._flags: dict[torch.device, torch.Tensor] = {}

    def flags_for(self, device: torch.device) -> torch.Tensor:
        """The device's flags, int32 (the fused router raises them with an atomic)."""
        device = torch.device(device)
        flags = self._flags.get(device)
        if flags is None:  # kept across passes: a normal tensor even when the first pass runs in inference mode
            with torch.inference_mode(False):
                flags = self._flags[device] = torch.zeros(len(self.names), dtype=torch.int32, device=device)
        return flags

    def mark(self, index: int, bad: torch.Tensor) -> None:
        self.flags_for(bad.device)[index] |= bad

    def raise_if_bad(self) -> None:
        bad = set()
        for flags in self._flags.values():
            if flags.any():
                bad.update(torch.nonzero(flags).flatten().tolist())
                flags.zero_()
        if bad:
            raise FloatingPointError(f"non-finite router logits in MoE block(s) {[self.names[i] for i in sorted(bad)]}: "
                                     "check the weights and the inputs")


def local_executor(block: "MoEBlock", hidden: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor) -> torch.Tensor:
    return run_experts(hidden, topk_ids, topk_weights, block.expert_weights(), block.backend)


class MoEBlock(nn.Module):
    def __init__(self, spec: RouterSpec, backend: str, capacity: str | None = None):
        super().__init__()
        if capacity not in (None, "dropless", "hf"):
            raise ValueError(f"capacity must be None/'dropless' (every token reaches its experts) or 'hf', "
                             f"got {capacity!r}")
        self.spec = spec
        self.backend = backend
        self.capacity = None if capacity == "dropless" else capacity
        self.executor = local_executor
        # Set by patch_moe: the model's RouterHealth and this block's index in it. A block used on its own
        # checks its logits itself.
        self.health: tuple[RouterHealth, int] | None = None
        # Per-expert routed pair counts (last slot: dropped pairs), accumulated on the device when a server or
        # benchmark asks for load statistics (`track_routing`); read on the host only when someone asks
        # (`engine.moe.patch.routing_counts`, e.g. a /metrics scrape).
        self.routed_counts: torch.Tensor | None = None

    def expert_weights(self) -> ExpertWeights:
        raise NotImplementedError

    def router_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def extra_output(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden_size = hidden_states.shape
        x = hidden_states.reshape(-1, hidden_size)
        try:
            if self.backend == "triton" and (self.capacity is None or self.spec.expert_capacity is None):
                topk_ids, topk_weights = self._fused_route(x)
            else:
                topk_ids, topk_weights = self._torch_route(x, (batch, seq_len))
            out = self.executor(self, x, topk_ids, topk_weights)
        except Exception as err:
            where = f"MoE block ({self.extra_repr()}) on {x.shape[0]} tokens"
            explained = explain_launch_failure(err, x.device, where)
            if explained is err:
                raise
            raise explained from err
        extra = self.extra_output(x)
        if extra is not None:
            out = out + extra
        return out.view(batch, seq_len, hidden_size)

    def _torch_route(self, x: torch.Tensor, sequence_shape: tuple[int, int]):
        logits = router_logits(self.spec, x, *self.router_parameters())
        bad = ~torch.isfinite(logits).all()
        if self.health is None:
            self._raise_if_bad(bad)
        else:
            health, index = self.health
            health.mark(index, bad)
        topk_ids, topk_weights = route(self.spec, logits, x.dtype, sequence_shape, self.capacity)
        if self.routed_counts is not None:  # on the device: bincount would read its size back to the host
            ids = topk_ids.reshape(-1).clamp(0, self.spec.num_experts)
            self.routed_counts.index_add_(0, ids, torch.ones_like(ids, dtype=self.routed_counts.dtype))
        return topk_ids, topk_weights

    def _fused_route(self, x: torch.Tensor):
        """The router in one Triton launch (`tessera_kernels.routing`), same arithmetic as `_torch_route`."""
        from tessera_kernels.routing import fused_route

        weight, bias = self.router_parameters()
        spec = self.spec
        switch = spec.kind == "switch"
        weights_dtype = x.dtype if switch or not spec.weights_in_fp32 else torch.float32
        if self.health is None:
            flag = torch.zeros(1, dtype=torch.int32, device=x.device)
        else:
            health, index = self.health
            flag = health.flags_for(x.device)[index : index + 1]
        routed = fused_route(x, weight, bias, spec.top_k, switch=switch, normalize=spec.normalize and not switch,
                             weights_dtype=weights_dtype, bad_flag=flag, counts=self.routed_counts,
                             ids_dtype=torch.int32)
        if self.health is None:
            self._raise_if_bad(flag)
        return routed

    def _raise_if_bad(self, bad: torch.Tensor) -> None:
        """A block used on its own checks at once: a host synchronisation that a patched model avoids."""
        if bad:
            raise FloatingPointError(f"non-finite router logits in MoE block {self.extra_repr()}")

    def extra_repr(self) -> str:
        s = self.spec
        return (f"kind={s.kind}, experts={s.num_experts}, top_k={s.top_k}, backend={self.backend}, "
                f"capacity={self.capacity or 'dropless'}")

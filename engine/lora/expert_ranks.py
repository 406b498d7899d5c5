"""Expert LoRA under a distributed strategy: which adapters other ranks' tokens carry, and where this rank keeps them.

Under MoEShard and expert parallelism a rank computes tokens of every rank, but a token's adapter slots index
the cache of the rank it came from, and ranks fill their caches in different orders (and only with the
adapters of their own batches). So per forward pass the ranks agree on a slot table, riding on the pass's one
host synchronisation (`engine.parallel.pass_sync`, as a listener): each rank sends, per cache slot, the id of
the expert adapter its batch holds there (-1 for none) and how many adapters its tokens mix. Every rank then
pins the other ranks' adapters in its own cache (loading those it lacks) and builds `table[rank, slot]` -> its
own slot. The executors send each token's slots and weights along with the token (in the same collective)
and translate them on arrival with the table: nothing more is exchanged and nothing is read back to the host
inside a layer. Every rank must hold the same pool (the same adapter names); the union of the adapters the
ranks' batches use must fit one rank's cache.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

import torch

from engine.lora.errors import AdapterError, CacheFullError
from engine.lora.experts import ExpertLoRA


def adapter_id(name: str) -> int:
    """An id of the adapter name that is the same on every rank (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=7).digest(), "big")


class RankSlots:
    """The pass's agreement on expert adapter slots across ranks (a `PassSync` listener; see the module
    docstring). `k`: adapters per token every rank sends (0: no rank's batch has expert adapters)."""

    def __init__(self, state, dist):
        self.state, self.dist = state, dist
        self.k = 0
        self.table: torch.Tensor | None = None  # [ranks, slots] int32 on the device: this rank's slot or -1
        self._pinned: list[str] = []  # other ranks' adapters pinned in this rank's cache for the running call

    def _local(self) -> tuple[int, list[tuple[int, str]]]:
        """(adapters per token, [(slot, name)]) of this rank's batch, expert adapters only."""
        state = self.state
        if state.slots is None:
            return 0, []
        pool = state.cache.pool
        held = [(slot, name) for name, slot in state.adapters.items() if pool.spec(name).experts]
        return (state.slots.shape[1] if held else 0), held

    def history(self) -> torch.Tensor:
        k, held = self._local()
        row = torch.full((1 + self.state.cache.capacity,), -1, dtype=torch.int64)
        row[0] = k
        for slot, name in held:
            row[1 + slot] = adapter_id(name)
        return row.to(self.dist.device)

    def receive(self, gathered: torch.Tensor) -> None:
        """gathered: (ranks, 1 + slots) on the host, every rank's `history`."""
        self.release()
        self.k = int(gathered[:, 0].max())
        if self.k == 0:
            self.table = None
            return
        cache = self.state.cache
        names = {adapter_id(n): n for n in cache.pool.names}
        own = dict(self.state.adapters) if self.state.slots is not None else {}
        wanted = {}
        for rank, row in enumerate(gathered[:, 1:].tolist()):
            for slot, ident in enumerate(row):
                if ident < 0:
                    continue
                if ident not in names:
                    raise AdapterError(f"rank {rank}'s batch uses an expert adapter (id {ident}) that this rank "
                                       f"({self.dist.rank}) has not loaded: every rank must load the same adapters")
                wanted[(rank, slot)] = names[ident]
        others = [n for n in dict.fromkeys(wanted.values()) if n not in own]
        try:
            slot_of = {**cache.acquire(others), **own}
        except CacheFullError as err:
            union = sorted(set(wanted.values()))
            raise CacheFullError(f"the ranks' batches use {len(union)} expert adapters together ({union}), and each "
                                 f"rank's cache must hold all of them: {err}") from err
        self._pinned = others
        table = torch.full((self.dist.size, cache.capacity), -1, dtype=torch.int32)
        for (rank, slot), name in wanted.items():
            table[rank, slot] = slot_of[name]
        self.table = table.to(self.dist.device)

    def own_k(self) -> int:
        """Adapters per token this rank's batch sends (0 when none of its adapters adapts experts)."""
        return self._local()[0]

    def agreed(self) -> tuple[int, torch.Tensor | None]:
        """(k, table) for this pass. One rank agrees with itself without a gather, so it reads its own batch."""
        if self.dist.size == 1:
            return self.own_k(), None
        return self.k, self.table

    def release(self) -> None:
        """Unpin the other ranks' adapters (at the next agreement, or when the call ends)."""
        pinned, self._pinned = self._pinned, []
        self.state.cache.release(pinned)


class BlockExpertLoRA:
    """`block.expert_lora`: the block's expert adapters for a distributed executor. `part(shard)` binds it to
    the part of the experts (a ShardedExperts) the executor runs: each token's adapters to send with it
    (`routing`), and the part's weights with the adapters of the rows that arrived (`attach`)."""

    def __init__(self, experts: str, state, shard=None):
        self.experts, self.state, self.shard = experts, state, shard

    def part(self, shard) -> BlockExpertLoRA:
        return BlockExpertLoRA(self.experts, self.state, shard)

    def routing(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(slots [T, k] int32, weights [T, k] fp32) of this rank's `tokens` tokens in its own cache's slots,
        k as agreed (padded with -1), or None when no rank's batch has expert adapters in this pass."""
        state, ranks = self.state, self.state.ranks
        if ranks is None:
            if state.slots is not None and self._stacks() is not None:
                raise AdapterError(f"{self.experts!r}: expert LoRA under a distributed strategy needs the model "
                                   "called through its LoRAModel, so the ranks agree on adapter slots")
            return None
        k, _ = ranks.agreed()
        if k == 0 or self._stacks() is None:  # every rank's pool adapts the same expert parameters
            return None
        slots = torch.full((tokens, k), -1, dtype=torch.int32, device=ranks.dist.device)
        weights = torch.zeros(tokens, k, dtype=torch.float32, device=ranks.dist.device)
        if ranks.own_k() and tokens:  # a batch without expert adapters sends none (its k may exceed the agreed)
            own_slots, own_weights = state.token_routing(tokens)
            slots[:, :own_slots.shape[1]] = own_slots
            weights[:, :own_weights.shape[1]] = own_weights
        return slots, weights

    def attach(self, weights, slots: torch.Tensor, adapter_weights: torch.Tensor, sources: torch.Tensor):
        """`weights` (the part's ExpertWeights) with the LoRA of the rows that arrived: their `slots` in the
        cache of their `sources` rank, translated to this rank's slots."""
        _, table = self.state.ranks.agreed()
        if table is not None:
            found = table[sources.long()[:, None], slots.clamp(min=0).long()]
            slots = torch.where(slots >= 0, found, -1)
        lora = ExpertLoRA(*self._stacks(), lambda tokens: (slots, adapter_weights), self.state.backend)
        shard = self.shard
        lora = lora.slice(shard.start, shard.stop, shard.ffn_width) if shard.kind == "ffn" else \
            lora.experts(shard.start, shard.stop)
        return replace(weights, lora=lora)

    def _stacks(self):
        return expert_stacks(self.state.cache, self.experts)


def expert_stacks(cache, experts: str):
    """[gate_up, down] of an experts module as ExpertLoRA takes them ((A, B, scales) or None each), or None when
    no adapter of the pool adapts the module."""
    out = []
    for param in ("gate_up_proj", "down_proj"):
        key = f"{experts}.{param}"
        out.append((*cache.stacks(key), cache.scales(key)) if key in cache.expert_parameters() else None)
    return None if all(pair is None for pair in out) else out

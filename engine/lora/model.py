"""`attach_adapters`: wrap a transformers model so every batch row runs its own weighted mix of LoRA adapters.

The returned `LoRAModel` forwards everything to the wrapped model, and its `forward`/`generate` take either
`adapter_weights=[{name: weight}, ...]` (one dict per row, `{}` = base model) or `route="auto"`, where the
router decides per row from `queries=[...]` (one text per row) or, without queries, from the row's input ids
decoded with the tokenizer (padding dropped; the tokenizer is the one passed to attach_adapters, else the
one saved beside the model's weights). Inference only: calls run under `torch.no_grad()`.

`load_adapter(name, folder)` and `unload_adapter(name)` change the pool of a live model: they wait for the
running call to finish, check everything before changing anything, and leave pool, cache and model as they
were when they refuse (an adapter in use, a duplicate name, an adapter for another base, a bad file).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from engine.lora.adapters import AdapterPool, AdapterSpec
from engine.lora.cache import AdapterCache
from engine.lora.errors import AdapterError, RoutingError
from engine.lora.expert_ranks import BlockExpertLoRA, RankSlots, expert_stacks
from engine.lora.experts import ExpertLoRA
from engine.lora.layer import MixtureLoRALinear, MixtureState


class LoRAModel:
    """A base model plus an adapter pool (and optionally a router); see the module docstring."""

    def __init__(self, model: nn.Module, pool: AdapterPool, cache: AdapterCache, state: MixtureState,
                 router=None, tokenizer=None):
        self.model, self.pool, self.cache, self.state = model, pool, cache, state
        self.router, self.tokenizer = router, tokenizer
        self._lock = threading.RLock()
        self._pool_version = pool.version

    # ---- a live pool -----------------------------------------------------------------------------------
    def load_adapter(self, name: str, folder) -> AdapterSpec:
        """Add one PEFT LoRA folder to the pool of this model (vLLM's load_lora_adapter)."""
        with self._lock:
            spec = self.pool.check(name, folder)
            self.pool.check_model(self.model, [spec])
            self.pool.add_spec(spec)
            try:
                self._follow_pool()
            except Exception:
                self.pool.remove(name)
                self.cache.refresh()
                self._pool_version = self.pool.version
                raise
            return spec

    def unload_adapter(self, name: str) -> None:
        """Remove an adapter (vLLM's unload_lora_adapter); refused while a running batch holds it. Tasks the
        router mapped to it lose that share (it goes to the base model)."""
        with self._lock:
            self.pool.spec(name)
            self.cache.unload(name)  # raises while pinned
            self.pool.remove(name)
            self.cache.refresh()
            self._pool_version = self.pool.version
            if self.router is not None:
                for share in self.router.task_adapters.values():
                    share.pop(name, None)

    def _follow_pool(self) -> None:
        """Wrap modules and expert blocks that adapters added since the last call adapt; resize the cache."""
        if self.pool.version == self._pool_version:
            return
        self.cache.refresh()
        wrap_modules(self.model, self.pool, self.state)
        self._pool_version = self.pool.version

    def __getattr__(self, name):
        # Only called for attributes LoRAModel lacks: config, device, generation_config, ...
        return getattr(self.__dict__["model"], name)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, adapter_weights=None, route=None, queries=None, route_kwargs=None, seq_lens=None,
                **kwargs):
        """`seq_lens`: a packed batch ([1, T] inputs holding rows of these lengths back to back; the model's
        own inputs, e.g. position_ids, must keep the rows apart): adapter_weights has one entry per row."""
        # Through __call__, so the model's hooks run (a distributed model's one agreement per pass).
        return self._run(self.model, args, kwargs, adapter_weights, route, queries, route_kwargs, seq_lens)

    def generate(self, *args, adapter_weights=None, route=None, queries=None, route_kwargs=None, **kwargs):
        return self._run(self.model.generate, args, kwargs, adapter_weights, route, queries, route_kwargs, None)

    def _run(self, fn, args, kwargs, adapter_weights, route, queries, route_kwargs, seq_lens):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise RoutingError("pass input_ids or inputs_embeds so the rows of the batch are known")
        rows = ref.shape[0]
        if seq_lens is not None:
            seq_lens = torch.as_tensor(seq_lens, dtype=torch.long)
            if ref.shape[0] != 1 or seq_lens.dim() != 1 or int(seq_lens.sum()) != ref.shape[1] or \
                    bool((seq_lens < 0).any()):
                raise RoutingError(f"seq_lens must be row lengths that sum to the packed length {ref.shape[-1]} of "
                                   f"a [1, T] batch, got {seq_lens.tolist()} for {tuple(ref.shape)}")
            rows = seq_lens.numel()
        with self._lock, torch.no_grad():
            if route is not None:
                adapter_weights = self._route(route, queries, input_ids, kwargs.get("attention_mask"),
                                              rows, route_kwargs or {})
            elif queries is not None:
                raise RoutingError("queries= is only used with route='auto'")
            with self.mixing(adapter_weights, rows, seq_lens):
                return fn(*args, **kwargs)

    @contextmanager
    def mixing(self, adapter_weights, rows: int, seq_lens=None):
        """Every forward of the wrapped model inside runs row b of its batch with the mixture
        `adapter_weights[b]`: for callers that run parts of a model themselves (an encoder-decoder's encoder and
        cross-attention projections when a request joins, then its decoder steps), where `forward` would need
        the whole model's inputs."""
        with self._lock, torch.no_grad():
            _follow_strategy(self.model, self.state)
            names = self._activate(adapter_weights, rows, seq_lens)
            try:
                yield
            finally:
                self.state.clear()
                self.cache.release(names)

    def _route(self, route, queries, input_ids, attention_mask, rows, route_kwargs) -> list[dict[str, float]]:
        if route != "auto":
            raise RoutingError(f"route must be 'auto', got {route!r}")
        if self.router is None:
            raise RoutingError("route='auto' needs a router: attach_adapters(model, pool, router=...)")
        if queries is None:
            queries = self._decode(input_ids, attention_mask)
        if len(queries) != rows:
            raise RoutingError(f"{len(queries)} queries for a batch of {rows} rows")
        return [d.adapters for d in self.router.route(list(queries), **route_kwargs)]

    def _decode(self, input_ids, attention_mask) -> list[str]:
        if input_ids is None:
            raise RoutingError("route='auto' without queries= needs input_ids to decode")
        tokenizer = self._tokenizer()
        texts = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            texts.append(tokenizer.decode(ids.tolist(), skip_special_tokens=True))
        return texts

    def _tokenizer(self):
        """The tokenizer given to attach_adapters, else the one saved beside the model's weights (local only)."""
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            source = getattr(self.model.config, "_name_or_path", "")
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            except Exception as exc:
                raise RoutingError(f"route='auto' without queries= needs a tokenizer and none was found beside "
                                   f"the model ({source!r}); pass queries=[...] or "
                                   f"attach_adapters(..., tokenizer=...)") from exc
        return self.tokenizer

    def _activate(self, adapter_weights, rows, seq_lens=None) -> list[str]:
        """Pin the batch's adapters in the cache and publish slots/weights to the layers."""
        if adapter_weights is None:
            return []
        if len(adapter_weights) != rows:
            raise RoutingError(f"adapter_weights has {len(adapter_weights)} entries for a batch of {rows} rows")
        mixes = []
        for b, mix in enumerate(adapter_weights):
            if not isinstance(mix, Mapping):
                raise RoutingError(f"adapter_weights[{b}] must be a dict adapter -> weight, got {type(mix).__name__}")
            for name, w in mix.items():
                if name not in self.pool:
                    raise RoutingError(f"adapter_weights[{b}] names unknown adapter {name!r}")
                if not math.isfinite(float(w)):
                    raise RoutingError(f"adapter_weights[{b}][{name!r}] = {w} is not finite")
            mixes.append({n: float(w) for n, w in mix.items() if float(w) != 0.0})
        names = list(dict.fromkeys(n for mix in mixes for n in mix))
        k = max((len(mix) for mix in mixes), default=0)
        if k == 0:
            return []
        self._follow_pool()
        slot_of = self.cache.acquire(names)
        slots = torch.full((rows, k), -1, dtype=torch.int32)
        weights = torch.zeros(rows, k, dtype=torch.float32)
        for b, mix in enumerate(mixes):
            for j, (name, w) in enumerate(mix.items()):
                slots[b, j] = slot_of[name]
                weights[b, j] = w
        device = self.cache.device
        self.state.set(slots.to(device), weights.to(device), None if seq_lens is None else seq_lens.to(device),
                       slot_of)
        return names


def attach_adapters(model: nn.Module, adapters, router=None, *, tokenizer=None, cache_bytes: int | None = None,
                    backend: str = "auto", base_model: str | None = None) -> LoRAModel:
    """Wrap `model`'s adapted linear layers and return a `LoRAModel`.

    adapters: dict adapter name -> PEFT folder, an `AdapterPool`, or a `TaskRouter` built with a pool (then it
    is also the router). cache_bytes: device byte budget for adapter weights (None = all resident).
    backend: "auto" (Triton where it runs, else PyTorch), "triton" or "torch".
    """
    from engine.lora.router import TaskRouter

    if isinstance(adapters, TaskRouter):
        if router is not None and router is not adapters:
            raise RoutingError("pass the router either as adapters= or as router=, not two different ones")
        router = adapters
        if router.pool is None:
            raise AdapterError("this TaskRouter has no adapter pool; build it with adapters=...")
        pool = router.pool
    elif isinstance(adapters, AdapterPool):
        pool = adapters
    elif isinstance(adapters, Mapping):
        pool = AdapterPool({n: Path(p) for n, p in adapters.items()}, base_model=base_model)
    else:
        raise AdapterError(f"adapters must be a dict name -> folder, an AdapterPool or a TaskRouter, "
                           f"got {type(adapters).__name__}")
    if router is not None:
        router.check_pool(pool)
    if any(isinstance(m, MixtureLoRALinear) for m in model.modules()):
        raise AdapterError("this model already has adapters attached")
    pool.check_model(model)
    param = next(model.parameters())
    cache = AdapterCache(pool, param.device, param.dtype, cache_bytes)
    state = MixtureState(cache, backend)
    wrap_modules(model, pool, state)
    _follow_strategy(model, state)
    return LoRAModel(model, pool, cache, state, router, tokenizer)


def _follow_strategy(model: nn.Module, state: MixtureState) -> None:
    """On a distributed model (`engine.parallel`), join the pass agreement on expert adapter slots, once. Every
    rank gets here at the same point (attaching, or its first call after the strategy was applied), so the
    ranks' agreements stay the same size."""
    parallel = getattr(model, "tessera_parallel", None)
    if parallel is not None and state.ranks is None:
        state.ranks = RankSlots(state, parallel.dist)
        parallel.sync.add_listener(state.ranks)


def _ensure_moe_blocks(model: nn.Module) -> None:
    """Expert LoRA runs inside tessera's MoE blocks: convert a Hugging Face MoE model in place if needed."""
    from engine.moe.layer import MoEBlock
    from engine.families import patch_moe

    if not any(isinstance(m, MoEBlock) for m in model.modules()):
        patch_moe(model)


def wrap_modules(model: nn.Module, pool: AdapterPool, state: MixtureState) -> None:
    """Wrap every adapted nn.Linear not wrapped yet, and hook every adapted expert block not hooked yet."""
    for module in pool.shapes:
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if not isinstance(layer, MixtureLoRALinear):
            setattr(parent, child, MixtureLoRALinear(layer, module, state))
    experts_modules = dict.fromkeys(key.rpartition(".")[0] for key in pool.expert_shapes)
    if experts_modules:
        _ensure_moe_blocks(model)
    for experts in experts_modules:
        block = model.get_submodule(experts.rpartition(".")[0])
        if not hasattr(block, "expert_weights"):
            raise AdapterError(f"{experts!r} is not inside a tessera MoE block, so its expert LoRA cannot run")
        if not isinstance(block.__dict__.get("expert_weights"), _ExpertHook):
            block.expert_weights = _ExpertHook(block.expert_weights, experts, state)
            block.expert_lora = BlockExpertLoRA(experts, state)  # what distributed executors ask for
            block.register_forward_pre_hook(_before_block(state))


def _before_block(state: MixtureState):
    """Note the batch's rows for the block's token routing."""

    def hook(module, args):
        state.rows_seen = args[0].shape[0] if args and args[0].dim() == 3 else None
    return hook


class _ExpertHook:
    """A block's `expert_weights` with the batch's expert LoRA attached while a batch with adapters runs (the
    one-process executor; distributed executors use `block.expert_lora`)."""

    def __init__(self, base, experts: str, state: MixtureState):
        self.base, self.experts, self.state = base, experts, state

    def __call__(self):
        weights = self.base()
        stacks = None if self.state.slots is None else expert_stacks(self.state.cache, self.experts)
        if stacks is None:
            return weights
        return replace(weights, lora=ExpertLoRA(*stacks, self.state.token_routing, self.state.backend))

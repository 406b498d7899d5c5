"""Rank-local loading: build the model without weights, then read from safetensors only what this rank keeps.

Dense tensors (attention, embeddings, norms, routers, shared experts) are read whole on every rank; expert
tensors only as this rank's slice (MoEShard: rows `[start, stop)` of every expert's first matrices and the same
columns of its second) or its own experts (EP). Memory per rank is therefore about dense weights + expert
weights / G (2/G under `auto`, which keeps both parts), and the bytes read are reported on the model.

Checkpoints store experts one tensor per expert and matrix (transformers 5 writes them back in that form too),
or stacked per matrix, under names that can differ from the in-memory module names (Mixtral: `block_sparse_moe`
on disk, `mlp` in memory); each family declares its layout (`Family.expert_keys`, `stacked_keys`,
`name_aliases`). Every key the model maps to is claimed, read by this rank or not, so a tensor no rank would
use is an error rather than silently ignored.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict

import torch
from torch import nn

from engine.moe.experts import ExpertWeights, check_backend, default_backend
from engine.moe.patch import set_backend
from engine.parallel.layout import ShardedExperts, fill
from engine.parallel.runtime import init_distributed
from engine.parallel.strategy import install_executors, plan_parts
from foundation.io import Checkpoint


class CheckpointReader(Checkpoint):
    """A checkpoint read under one family's on-disk names (`Family.checkpoint_names`), keeping count of the keys
    the model claimed, read by this rank or not."""

    def __init__(self, folder: str, family):
        super().__init__(folder)
        self.family, self.claimed = family, set()

    def checkpoint_name(self, model_name: str) -> str | None:
        """The checkpoint key holding the model's tensor `model_name` (claimed), or None."""
        found = next((c for c in self.family.checkpoint_names(model_name) if c in self.file_of), None)
        if found is not None:
            self.claimed.add(found)
        return found

    def require(self, model_name: str) -> str:
        found = self.checkpoint_name(model_name)
        if found is None:
            raise KeyError(f"{self.folder}: the checkpoint has no tensor {model_name!r}, which the model needs "
                           f"(family {self.family.name!r}; files {sorted({p.name for p in self.file_of.values()})})")
        return found


def _read_stacked(reader: CheckpointReader, block_name: str, part: ShardedExperts) -> ExpertWeights:
    """This rank's part of experts stored stacked (one tensor per matrix for all experts)."""
    names = reader.family.stacked_keys
    for name in ("b1", "b2"):  # claimed on every rank, read where this rank's part has them
        reader.checkpoint_name(f"{block_name}.{names[name]}")
    keys = {name: reader.require(f"{block_name}.{names[name]}") for name in ("w1", "w2", "b1", "b2")
            if name in ("w1", "w2") or getattr(part, name) is not None}
    cut = (part.start, part.stop)
    if part.kind == "ffn":  # FFN columns of every expert: dim 1 of w1/b1, dim 2 of w2; b2 with the first slice
        index = {"w1": (None, cut), "w2": (None, None, cut), "b1": (None, cut), "b2": (None,)}
    else:  # whole experts [start, stop)
        index = {name: (cut,) for name in ("w1", "w2", "b1", "b2")}
    tensors = {name: reader.read_part(key, index[name]) for name, key in keys.items()}
    return ExpertWeights(tensors["w1"], tensors["w2"], None, part.activation, b1=tensors.get("b1"),
                         b2=tensors.get("b2"))


def _read_per_expert(reader: CheckpointReader, block_name: str, part: ShardedExperts) -> ExpertWeights:
    """This rank's part of experts stored one tensor per expert and matrix (`Family.expert_keys`)."""
    family = reader.family
    if family.expert_keys is None:
        raise ValueError(f"family {family.name!r} declares no on-disk expert layout (Family.expert_keys "
                         "or Family.stacked_keys)")
    if part.b1 is not None or part.b2 is not None:
        raise ValueError(f"{block_name}: family {family.name!r} has expert biases but no stacked "
                         "checkpoint layout (Family.stacked_keys)")
    keys = [[None if pattern is None else reader.require(f"{block_name}.{pattern.format(i=expert)}")
             for pattern in family.expert_keys] for expert in range(part.num_experts)]  # every rank's, claimed
    ffn, cut = part.kind == "ffn", (part.start, part.stop)
    first, second, partner = [], [], []
    for k1, k2, k3 in keys if ffn else keys[part.start : part.stop]:
        first.append(reader.read_part(k1, (cut,) if ffn else ()))
        second.append(reader.read_part(k2, (None, cut) if ffn else ()))
        if k3 is not None:
            partner.append(reader.read_part(k3, (cut,) if ffn else ()))
    return ExpertWeights(torch.stack(first), torch.stack(second), torch.stack(partner) if partner else None,
                         part.activation)


def _fill_part(reader: CheckpointReader, block_name: str, part: ShardedExperts, device, dtype) -> None:
    read = (_read_per_expert if reader.family.stacked_keys is None else _read_stacked)(reader, block_name, part)
    expected = part.weights()
    for name in ("w1", "w2", "w3", "b1", "b2"):
        got, want = getattr(read, name), getattr(expected, name)
        if (got is None) != (want is None) or (got is not None and got.shape != want.shape):
            raise ValueError(f"{block_name}.{name}: checkpoint gives {None if got is None else tuple(got.shape)}, "
                             f"the config implies {None if want is None else tuple(want.shape)}")
    part.to_empty(device=device).to(dtype or read.w1.dtype)
    fill(part, read)


def _fill_dense(model: nn.Module, reader: CheckpointReader, skip: set[int], device, dtype) -> None:
    """Load every parameter still on the meta device; tied parameters (one object under several names) are
    read once and stay tied."""
    holders = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            if id(param) not in skip:
                holders[id(param)].append((module_name, module, attr, param))
    missing = []
    for group in holders.values():
        names = [f"{m}.{a}" if m else a for m, _, a, _ in group]
        keys = [k for k in map(reader.checkpoint_name, names) if k is not None]  # a tied copy may be stored too
        if not keys:
            missing.append(names[0])
            continue
        tensor = _read_checked(reader, keys[0], group[0][3].shape)
        param = nn.Parameter(tensor.to(device=device, dtype=dtype or tensor.dtype), requires_grad=False)
        for _, module, attr, _ in group:
            module._parameters[attr] = param
    _fill_buffers(model, reader)
    if missing:  # tied copies (embeddings, LM head) are not stored: transformers ties them to the loaded one
        model.tie_weights()
        still = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
        if still:
            raise KeyError(f"{reader.folder}: the checkpoint lacks {len(still)} weights that "
                           f"{type(model).__name__} needs (nothing is initialised at random): {still[:5]}")


def _read_checked(reader: CheckpointReader, key: str, expected) -> torch.Tensor:
    tensor = reader.read_part(key)
    if tensor.shape != expected:
        raise ValueError(f"{reader.file_of[key]}: tensor {key} has shape {tuple(tensor.shape)}, the model "
                         f"expects {tuple(expected)}")
    return tensor


def _fill_buffers(model: nn.Module, reader: CheckpointReader) -> None:
    """Persistent buffers the checkpoint holds are loaded; those it lacks stay as the model built them (the
    buffers transformers recreates on load, such as position ids and rotary frequencies)."""
    for module_name, module in model.named_modules():
        for attr, buf in module.named_buffers(recurse=False):
            key = None if attr in module._non_persistent_buffers_set else reader.checkpoint_name(
                f"{module_name}.{attr}" if module_name else attr)
            if key is not None and buf is not None:
                buf.copy_(_read_checked(reader, key, buf.shape))


def _check_all_used(model: nn.Module, reader: CheckpointReader) -> None:
    """Every checkpoint tensor maps to a model weight, but those transformers itself drops on load."""
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unused = sorted(k for k in set(reader.names) - reader.claimed if not any(p.search(k) for p in ignore))
    if unused:
        files = sorted({reader.file_of[k].name for k in unused})
        raise ValueError(f"{reader.folder}: {len(unused)} tensors in {files} are not used by "
                         f"{type(model).__name__} (a checkpoint of another model class?): {unused[:5]}")


def build_on_meta(model_class, config) -> nn.Module:
    """The model's skeleton without weights (every parameter on the meta device)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return (getattr(model_class, "from_config", None) or model_class._from_config)(config)  # Auto* or concrete


def load_rank_part(model: nn.Module, source, family, *, strategy: str, backend: str | None = None, dtype=None,
                   device=None, **executor_options) -> nn.Module:
    """`engine.load`'s `shard` step under a distributed strategy: fill a patched meta-device model with this rank's
    part of the checkpoint in `source` and install the strategy's executors (`executor_options`:
    `install_executors`' capacity_factor, min_capacity, stats, calibration_tokens). Every weight must come from
    the checkpoint and every checkpoint tensor must be used. Bytes read are in `model.tessera_parallel.loaded_bytes`
    (`dense`, `experts`)."""
    if backend == "eager":
        raise ValueError("distributed strategies run tessera's expert backends (triton, torch, reference), not 'eager'")
    dist = init_distributed()
    # Each rank computes on its own device: under NCCL that is cuda:LOCAL_RANK whatever device was asked for.
    device = dist.device if device is None or torch.device(device).type == "cuda" else torch.device(device)
    backend = check_backend(backend or default_backend(device), device)
    parts = plan_parts(model, strategy, dist, meta=True)
    reader = CheckpointReader(source, family)
    try:
        for part_name, part in parts:
            _fill_part(reader, part_name.rsplit(".", 1)[0], part, device, dtype)
        expert_bytes = sum(r.nbytes for r in reader.reads)
        _fill_dense(model, reader, {id(p) for _, part in parts for p in part.parameters()}, device, dtype)
        _check_all_used(model, reader)
    finally:
        reader.close()
    model.to(device)  # buffers (built for real, on CPU) follow the weights
    set_backend(model, backend)
    state = install_executors(model, strategy, dist, **executor_options)
    state.loaded_bytes = {"experts": expert_bytes, "dense": sum(r.nbytes for r in reader.reads) - expert_bytes}
    state.reads = reader.reads
    logging.getLogger("tessera.parallel").info(
        "rank %d/%d (%s): read %.1f MB dense + %.1f MB experts", dist.rank, dist.size, strategy,
        state.loaded_bytes["dense"] / 1e6, state.loaded_bytes["experts"] / 1e6)
    model.eval()
    return model

"""`engine.load`: a registered name, a local folder or a cached hub id to a ready model, exactly as saved.

Five steps, each a function below: `resolve` (entry, folder, config, family, model class, dtype, device) →
`build` (the weights, every one checked against the checkpoint; or the skeleton on the meta device for a
distributed strategy) → `patch` (MoE blocks onto tessera's layer; nothing to do for a dense model) → `shard`
(this rank's part of the checkpoint, under a distributed strategy) → `attach` (LoRA adapters and their router).
A FlexMerge artifact is built by `merge` instead.

A weight the checkpoint lacks, or a checkpoint tensor the model does not use, is an error naming the tensors and
the folder; nothing is initialised at random. The only exceptions are those transformers itself makes on load:
tied weights (stored once, tied after loading), non-persistent buffers it recreates (position ids, rotary
frequencies) and the patterns a model class lists in `_keys_to_ignore_on_load_missing/unexpected`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.families import Family, family_for, patch_moe
from engine.registry import ModelEntry, _entry_for, default_device, get_adapter_path, model_class
from foundation.dtypes import parse_dtype
from foundation.io import Checkpoint
from merge.artifact import is_artifact, load_task_model


@dataclass
class LoadPlan:
    entry: ModelEntry
    folder: Path
    config: object
    family: Family
    model_class: type
    dtype: torch.dtype
    device: torch.device
    backend: str | None
    capacity: str | None
    strategy: str
    strategy_options: dict


def load(name_or_path, *, backend: str | None = None, dtype=None, device=None, capacity: str | None = None,
         strategy: str | None = None, strategy_options: dict | None = None, task: str | None = None, tasks=None,
         adapters=None, adapter_options: dict | None = None, cuda_graphs: bool = False):
    """A ready model: weights loaded as saved, MoE blocks on tessera's layer, eval mode.

    `name_or_path`: a registered name, a local folder (a Hugging Face checkpoint or a FlexMerge artifact), or a
    hub id already in the local cache. `backend`: "triton", "torch", "reference" or "eager" (Hugging Face's own
    modules). `capacity`: None (dropless) or "hf". `strategy` (under torchrun): "single", "moeshard", "ep",
    "ep-capacity" or "auto", with `strategy_options` for `engine.parallel.strategy.install_executors`
    (capacity_factor, min_capacity, stats, calibration_tokens). `task`: the task of a FlexMerge artifact, or
    "auto" to route each query to its nearest task by `tasks` (task -> validation examples, a task folder, or a
    `TaskRouter`). `adapters`: LoRA adapters to attach (registered adapter names, a dict name -> PEFT folder, an
    `AdapterPool` or a `TaskRouter`), with `adapter_options` for `engine.lora.attach_adapters`. `cuda_graphs`:
    generate() replays its decode steps from CUDA graphs, captured now per batch bucket (`engine.moe.graphs`;
    one CUDA device, strategy "single").
    """
    entry, folder = _entry_for(name_or_path)
    if is_artifact(folder):
        return load_artifact(folder, task, tasks, dtype=dtype, device=device)
    plan = resolve(entry, folder, backend=backend, dtype=dtype, device=device, capacity=capacity, strategy=strategy,
                   strategy_options=strategy_options)
    if cuda_graphs and (plan.device.type != "cuda" or plan.strategy != "single"):
        raise ValueError(f"cuda_graphs=True needs a CUDA device and strategy 'single', got {plan.device} and "
                         f"{plan.strategy!r} (ranks agree on token counts on the host before every pass)")
    model = shard(patch(build(plan), plan), plan)
    model.tessera_entry = plan.entry
    if cuda_graphs:
        from engine.moe.graphs import capture_decode_buckets, enable_graphed_decode

        capture_decode_buckets(enable_graphed_decode(model))
    return attach(model, adapters, adapter_options)


def resolve(entry: ModelEntry | None, folder: Path, *, backend, dtype, device, capacity, strategy,
            strategy_options=None) -> LoadPlan:
    """Everything the later steps need, settled before any weight is read. A folder without an entry gets one
    (its family `dense` when no MoE family claims its model type)."""
    from engine.parallel.strategy import check_strategy

    config = read_config(folder)
    family = family_for(entry.family if entry else config)
    entry = entry or ModelEntry(name=str(folder), family=family.name, source=str(folder))
    return LoadPlan(entry, folder, config, family, model_class(config, family, entry.model_class,
                                                               f"{folder}/config.json"),
                    parse_dtype(dtype or entry.dtype), torch.device(device) if device is not None else default_device(),
                    backend or entry.backend, capacity, check_strategy(strategy or "single"), strategy_options or {})


def read_config(folder: Path):
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"{folder}/config.json: transformers {transformers.__version__} cannot read it: {err}") from err


def build(plan: LoadPlan) -> nn.Module:
    """Single process: the model with every weight from the checkpoint, on its device. Distributed: the
    skeleton on the meta device (`shard` reads this rank's weights)."""
    if plan.strategy != "single":
        from engine.parallel.loading import build_on_meta

        return build_on_meta(plan.model_class, plan.config)
    Checkpoint(plan.folder)  # every header checked, the weight files found, before transformers reads them
    extra = {"experts_implementation": "eager"} if plan.backend == "eager" and plan.family.uses_experts_interface else {}
    model, info = plan.model_class.from_pretrained(plan.folder, config=plan.config, dtype=plan.dtype,
                                                   local_files_only=True, output_loading_info=True,
                                                   ignore_mismatched_sizes=True, **extra)  # reported below
    check_loading_info(info, plan.folder, type(model).__name__)
    return model.to(plan.device).eval()


def check_loading_info(info: dict, folder: Path, class_name: str) -> None:
    """Raise on what transformers would only log (weights it had to initialise, tensors it left unused) or
    report without names (tensors of the wrong shape)."""
    problems = [(sorted(info.get("missing_keys") or ()), f"lacks {{n}} weights that {class_name} needs "
                 "(nothing is initialised at random)"),
                (sorted(info.get("unexpected_keys") or ()), f"has {{n}} tensors that {class_name} does not use "
                 "(a checkpoint of another model class?)"),
                (sorted(f"{k} {tuple(got)} (model: {tuple(want)})" for k, got, want in info.get("mismatched_keys") or ()),
                 "has {n} tensors of the wrong shape")]
    for names, what in problems:
        if names:
            raise ValueError(f"{folder}: the checkpoint {what.format(n=len(names))}: {names[:5]}")


def patch(model: nn.Module, plan: LoadPlan) -> nn.Module:
    # On the meta device only the torch backend exists; `shard` sets the real one once weights are in.
    backend = plan.backend if plan.strategy == "single" else "torch"
    return patch_moe(model, backend=backend, capacity=plan.capacity, family=plan.family)


def shard(model: nn.Module, plan: LoadPlan) -> nn.Module:
    if plan.strategy == "single":
        return model
    from engine.parallel.loading import load_rank_part

    return load_rank_part(model, str(plan.folder), plan.family, strategy=plan.strategy, backend=plan.backend,
                          dtype=plan.dtype, device=plan.device, **plan.strategy_options)


def attach(model: nn.Module, adapters, adapter_options: dict | None) -> nn.Module:
    if adapters is None:
        return model
    from engine.lora import attach_adapters

    if isinstance(adapters, (list, tuple)):  # registered adapter names
        adapters = {name: get_adapter_path(name) for name in adapters}
    return attach_adapters(model, adapters, **(adapter_options or {}))


def load_artifact(folder: Path, task: str | None, tasks, *, dtype, device):
    """One task's model from a FlexMerge artifact, or (`task="auto"`) every query routed to its nearest task."""
    if task is None:
        raise ValueError(f"{folder} is a FlexMerge artifact: pass task=<name> to choose the task's model, "
                         "or task='auto' with tasks=<validation examples per task>")
    if task != "auto":
        return load_task_model(folder, task, dtype=dtype, device=device)
    if tasks is None:
        raise ValueError("task='auto' routes queries by the tasks' validation examples: pass tasks=")
    from engine.lora.router import TaskRouter
    from merge.task_paths import load_task_routed

    router = tasks if isinstance(tasks, TaskRouter) else TaskRouter.build(tasks)
    return load_task_routed(folder, router, dtype=dtype, device=device)

"""A FlexMerge artifact without a task id: each query takes the task path its text is nearest to.

FlexMerge builds one model per task from shared and unshared blocks, and needs the task id at inference. Here
a router (`engine.lora.TaskRouter`, the one LoRA adapters use: each task represented by its validation examples'
embeddings; anything with `task_names` and `route(queries, k, min_confidence)`) picks the task for every row, the batch is split by task, each part runs through its task's model (the task models
share the tensors of their shared blocks), and the outputs are put back in row order.
"""
from __future__ import annotations

import torch
from transformers.utils import ModelOutput

from merge.artifact import load_task_model, read_manifest


class TaskRoutedModel:
    def __init__(self, models: dict, router):
        missing = sorted(set(router.task_names) - set(models))
        if missing:
            raise ValueError(f"the router knows tasks {missing} that the artifact does not have "
                             f"(artifact tasks: {sorted(models)})")
        self.models, self.router = models, router

    @property
    def config(self):
        return next(iter(self.models.values())).config

    def route(self, queries: list[str]) -> list[str]:
        """The task of each query: the router's nearest task (no confidence fallback: every row needs a path)."""
        return [decision.tasks[0] for decision in self.router.route(list(queries), k=1, min_confidence=-1.0)]

    def __call__(self, *, queries: list[str], **inputs):
        return self.forward(queries=queries, **inputs)

    def forward(self, *, queries: list[str], **inputs) -> ModelOutput:
        """Run every row through its task's model. `queries` holds each row's text (for the router); `inputs`
        are the usual model inputs, batched along dim 0. Returns the outputs' tensors, rows in input order."""
        rows = len(queries)
        tasks = self.route(queries)
        merged: dict[str, torch.Tensor] = {}
        for task in dict.fromkeys(tasks):
            index = torch.tensor([i for i, t in enumerate(tasks) if t == task])
            part = {k: v[index] if torch.is_tensor(v) and v.shape[:1] == (rows,) else v for k, v in inputs.items()}
            with torch.no_grad():
                out = self.models[task](**part)
            for key, value in out.items():
                if torch.is_tensor(value) and value.shape[:1] == (len(index),):
                    if key not in merged:
                        merged[key] = value.new_zeros((rows, *value.shape[1:]))
                    merged[key][index.to(value.device)] = value
        return ModelOutput(merged)


def load_task_routed(artifact, router, *, dtype=None, device=None) -> TaskRoutedModel:
    """The artifact's task models that `router` knows, behind it."""
    artifact_tasks = read_manifest(artifact)["tasks"]
    models = {t: load_task_model(artifact, t, dtype=dtype, device=device) for t in artifact_tasks
              if t in router.task_names}
    return TaskRoutedModel(models, router)

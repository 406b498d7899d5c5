"""Adapter-task affinity: each adapter's loss on each task's validation set, for pools that do not map
one-to-one to tasks. A task then maps to the adapter(s) with the lowest loss; the matrix is saved with the
router so the choice can be audited and reused without rescoring.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from engine.lora.errors import RoutingError
from engine.lora.tasks import Task


@dataclass
class AffinityMatrix:
    adapters: list[str]
    tasks: list[str]
    loss: torch.Tensor  # [adapters, tasks], mean token loss (lower = better)

    def best(self, task: str, top: int = 1, temperature: float = 1.0) -> dict[str, float]:
        """The `top` lowest-loss adapters for `task`, shares softmax(-loss / temperature) among them."""
        if task not in self.tasks:
            raise RoutingError(f"task {task!r} is not in the affinity matrix")
        column = self.loss[:, self.tasks.index(task)]
        top = min(top, len(self.adapters))
        values, idx = torch.topk(-column, top)
        shares = torch.softmax(values / temperature, dim=0)
        return {self.adapters[i]: float(s) for i, s in zip(idx.tolist(), shares)}

    def to_dict(self) -> dict:
        return {"adapters": self.adapters, "tasks": self.tasks, "loss": self.loss.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping) -> AffinityMatrix:
        return cls(list(data["adapters"]), list(data["tasks"]), torch.tensor(data["loss"], dtype=torch.float32))


def _row_losses(lora_model, tokenizer, texts: list[str], adapter: str, device) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    logits = lora_model(**batch, adapter_weights=[{adapter: 1.0}] * len(texts)).logits.float()
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none",
                                                   ignore_index=-100)
    counts = (labels != -100).sum(1).clamp(min=1)
    return token_loss.sum(1) / counts


def compute_affinity(lora_model, tokenizer, tasks: Mapping[str, Task], adapters: list[str] | None = None,
                     max_examples: int = 16, batch_size: int = 8) -> AffinityMatrix:
    """Score every adapter of `lora_model.pool` (or `adapters`) on every task: mean LM loss over up to
    `max_examples` validation examples (input and target joined by a space)."""
    adapters = list(adapters if adapters is not None else lora_model.pool.names)
    if not adapters:
        raise RoutingError("no adapters to score")
    if tokenizer.pad_token is None:
        raise RoutingError("the tokenizer needs a pad token to batch validation examples")
    device = next(lora_model.model.parameters()).device
    loss = torch.zeros(len(adapters), len(tasks))
    for j, task in enumerate(tasks.values()):
        texts = [f"{x} {y}".strip() for x, y in task.pairs[:max_examples]]
        for i, adapter in enumerate(adapters):
            parts = [_row_losses(lora_model, tokenizer, texts[s:s + batch_size], adapter, device)
                     for s in range(0, len(texts), batch_size)]
            loss[i, j] = torch.cat(parts).mean().cpu()
    return AffinityMatrix(adapters, list(tasks), loss)

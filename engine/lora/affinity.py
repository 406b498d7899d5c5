"""Adapter-task affinity: each adapter's loss on the answers of each task's validation set, for pools that do
not map one-to-one to tasks. A task then maps to the adapter(s) with the lowest loss; the matrix is saved with the
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


def _encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of prompt + " " + target and the number of prompt tokens. The two parts are tokenized
    apart, so the boundary is exact whatever the tokenizer merges; a bare text (no target) is all answer."""
    if not target:
        prompt, target = "", prompt
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    tail = tokenizer((" " if prompt else "") + target, add_special_tokens=False)["input_ids"]
    return list(head) + list(tail), len(head)


def _answer_losses(lora_model, rows: list[tuple[list[int], int, str]], pad_id: int, device) -> torch.Tensor:
    """Mean next-token loss over the answer tokens of each row, every row with its own adapter, one pass."""
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, prompt_len, _) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        labels[i, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
    input_ids, attention, labels = input_ids.to(device), attention.to(device), labels.to(device)
    logits = lora_model(input_ids=input_ids, attention_mask=attention,
                        adapter_weights=[{adapter: 1.0} for _, _, adapter in rows]).logits.float()
    shifted = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, reduction="none",
                                                   ignore_index=-100)
    return (token_loss.sum(1) / (shifted != -100).sum(1).clamp(min=1)).cpu()


def compute_affinity(lora_model, tokenizer, tasks: Mapping[str, Task], adapters: list[str] | None = None,
                     max_examples: int = 16, batch_size: int = 64) -> AffinityMatrix:
    """Score every adapter of `lora_model.pool` (or `adapters`) on every task: the mean loss over the answer
    tokens (the target after the input; prompt tokens are not counted) of up to `max_examples` validation
    examples. Rows are (example, adapter) pairs, `batch_size` of them per forward pass: many adapters are
    scored in one batched pass through the mixture kernel, not one pass per adapter."""
    adapters = list(adapters if adapters is not None else lora_model.pool.names)
    if not adapters:
        raise RoutingError("no adapters to score")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise RoutingError("the tokenizer needs a pad token to batch validation examples")
    device = next(lora_model.model.parameters()).device
    rows, cells = [], []
    for j, task in enumerate(tasks.values()):
        for prompt, target in task.pairs[:max_examples]:
            ids, prompt_len = _encode_pair(tokenizer, prompt, target)
            if len(ids) <= prompt_len or len(ids) < 2:
                raise RoutingError(f"task {task.name!r}: example {prompt[:60]!r} has no answer tokens to score")
            for i, adapter in enumerate(adapters):
                rows.append((ids, prompt_len, adapter))
                cells.append((i, j))
    losses = torch.cat([_answer_losses(lora_model, rows[s:s + batch_size], pad_id, device)
                        for s in range(0, len(rows), batch_size)])
    total = torch.zeros(len(adapters), len(tasks))
    count = torch.zeros(len(adapters), len(tasks))
    for (i, j), value in zip(cells, losses.tolist()):
        total[i, j] += value
        count[i, j] += 1
    return AffinityMatrix(adapters, list(tasks), total / count)

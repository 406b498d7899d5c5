"""Affinity matrix: adapters scored by loss on each task's validation set; tasks map to the best adapter."""
import copy

import pytest
import torch

from engine import TaskRouter
from engine.lora import AdapterPool, Task, attach_adapters, compute_affinity, peft_weighted_model

from lora_helpers import LookupEncoder


class CharTokenizer:
    """Byte-level tokenizer with padding, enough for loss scoring on a tiny model."""

    pad_token = "<pad>"

    def __call__(self, texts, return_tensors="pt", padding=True):
        ids = [[1] + [3 + (ord(c) % 90) for c in t] for t in texts]
        width = max(map(len, ids))
        return _Batch(input_ids=torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                      attention_mask=torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]))


class _Batch(dict):
    def to(self, device):
        return _Batch({k: v.to(device) for k, v in self.items()})


def _loss(model, tokenizer, text):
    batch = tokenizer([text])
    with torch.no_grad():
        return float(model(**batch, labels=batch["input_ids"]).loss)


def test_affinity_scores_by_loss_and_maps_tasks(llama, adapter_dirs, tmp_path):
    pool = AdapterPool(adapter_dirs)
    tasks = {"sum": Task("sum", [{"input": "2+2=", "output": "4"}, {"input": "1+5=", "output": "6"}]),
             "greet": Task("greet", ["hello there", {"question": "hi?", "answer": "hey"}])}
    tokenizer = CharTokenizer()
    lm = attach_adapters(copy.deepcopy(llama), pool)
    matrix = compute_affinity(lm, tokenizer, tasks, batch_size=2)
    assert matrix.loss.shape == (4, 2) and matrix.tasks == ["sum", "greet"]
    oracle = peft_weighted_model(copy.deepcopy(llama), pool, {"beta": 1.0})
    expected = (_loss(oracle, tokenizer, "2+2= 4") + _loss(oracle, tokenizer, "1+5= 6")) / 2
    assert float(matrix.loss[1, 0]) == pytest.approx(expected, rel=1e-4)
    best = matrix.adapters[int(matrix.loss[:, 1].argmin())]
    assert matrix.best("greet") == {best: 1.0}
    table = {"2+2=": [1, 0], "1+5=": [1, 0], "hello there": [0, 1], "hi?": [0, 1]}
    router = TaskRouter.build(tasks, encoder=LookupEncoder(table), adapters=pool, affinity=matrix)
    assert router.task_adapters["greet"] == {best: 1.0}
    router.save(tmp_path / "router")
    loaded = TaskRouter.load(tmp_path / "router", encoder=LookupEncoder(table))
    torch.testing.assert_close(loaded.affinity.loss, matrix.loss)
    assert sorted(loaded.pool) == sorted(pool) and loaded.task_adapters == router.task_adapters

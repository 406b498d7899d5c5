"""Affinity matrix: adapters scored by their loss on the answer tokens of each task's validation set, all
adapters in one batched pass; tasks map to the best adapter."""
import copy

import pytest
import torch

from engine import TaskRouter
from engine.lora import AdapterPool, Task, attach_adapters, compute_affinity, peft_weighted_model

from lora_helpers import LookupEncoder


class CharTokenizer:
    """Character-level tokenizer (BOS = 1, pad = 0), enough for loss scoring on a tiny model."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [3 + (ord(c) % 90) for c in text]}


def _answer_loss(model, tokenizer, prompt, answer):
    """Mean loss over the answer's tokens only, written out independently of compute_affinity."""
    head = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([head + tokenizer((" " if prompt else "") + answer, add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[0, :len(head)] = -100  # transformers shifts labels inside the loss
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


def test_affinity_scores_by_loss_and_maps_tasks(llama, adapter_dirs, tmp_path):
    pool = AdapterPool(adapter_dirs)
    tasks = {"sum": Task("sum", [{"input": "2+2=", "output": "4"}, {"input": "1+5=", "output": "6"}]),
             "greet": Task("greet", ["hello there", {"question": "hi?", "answer": "hey"}])}
    tokenizer = CharTokenizer()
    lm = attach_adapters(copy.deepcopy(llama), pool)
    passes = []
    lm.model.model.register_forward_hook(lambda module, args, out: passes.append(1))
    matrix = compute_affinity(lm, tokenizer, tasks, batch_size=16)
    assert len(passes) == 1  # 4 examples x 4 adapters = 16 rows in one batched pass
    assert matrix.loss.shape == (4, 2) and matrix.tasks == ["sum", "greet"]
    torch.testing.assert_close(compute_affinity(lm, tokenizer, tasks, batch_size=9).loss, matrix.loss,
                               rtol=1e-5, atol=1e-5)
    oracle = peft_weighted_model(copy.deepcopy(llama), pool, {"beta": 1.0})
    expected = (_answer_loss(oracle, tokenizer, "2+2=", "4") + _answer_loss(oracle, tokenizer, "1+5=", "6")) / 2
    assert float(matrix.loss[1, 0]) == pytest.approx(expected, rel=1e-5)
    # a bare string is all answer; a question's prompt is not counted
    greet = (_answer_loss(oracle, tokenizer, "", "hello there") + _answer_loss(oracle, tokenizer, "hi?", "hey")) / 2
    assert float(matrix.loss[1, 1]) == pytest.approx(greet, rel=1e-5)
    best = matrix.adapters[int(matrix.loss[:, 1].argmin())]
    assert matrix.best("greet") == {best: 1.0}
    table = {"2+2=": [1, 0], "1+5=": [1, 0], "hello there": [0, 1], "hi?": [0, 1]}
    router = TaskRouter.build(tasks, encoder=LookupEncoder(table), adapters=pool, affinity=matrix)
    assert router.task_adapters["greet"] == {best: 1.0}
    router.save(tmp_path / "router")
    loaded = TaskRouter.load(tmp_path / "router", encoder=LookupEncoder(table))
    torch.testing.assert_close(loaded.affinity.loss, matrix.loss)
    assert sorted(loaded.pool) == sorted(pool) and loaded.task_adapters == router.task_adapters

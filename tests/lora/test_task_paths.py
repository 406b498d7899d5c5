"""A FlexMerge artifact loaded with task="auto": the task router picks each row's task path."""
import importlib.util
from pathlib import Path

import pytest
import torch

import engine
from engine.cli import main as tessera
from merge.task_paths import TaskRoutedModel
from merge.artifact import load_task_model

_MERGE_HELPERS = Path(__file__).parents[1] / "merge" / "merge_helpers.py"  # by path: any test folders collect
_spec = importlib.util.spec_from_file_location("merge_helpers", _MERGE_HELPERS)
merge_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(merge_helpers)

VALIDATION = {"a": ["What is 12 times 7?", "Add 5 and 9.", "Compute 81 divided by 9."],
              "b": ["Bonjour, comment allez-vous ?", "Merci beaucoup, mon ami.", "Je voudrais un café."],
              "c": ["The patient has a fever and a cough.", "Take two tablets daily.", "Symptoms of flu."]}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("flexmerge")
    base, models = merge_helpers.make_family(root, "bert", tasks=tuple(VALIDATION))
    args = ["merge", "--base", str(base), "--method", "task_arithmetic", "--size", "2", "--out", str(root / "art")]
    for task, folder in models.items():
        args += ["--model", f"{task}={folder}"]
    assert tessera(args) == 0
    return root / "art"


def test_rows_take_their_nearest_task_path(artifact):
    model = engine.load(str(artifact), task="auto", tasks=VALIDATION, device="cpu")
    assert isinstance(model, TaskRoutedModel)
    queries = ["Multiply 6 by 8.", "Où est la gare, s'il vous plaît ?", "Fever and a sore throat."]
    ids = torch.randint(5, 60, (3, 7))
    out = model(queries=queries, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert model.route(queries) == ["a", "b", "c"]
    for row, task in enumerate(["a", "b", "c"]):
        with torch.no_grad():
            want = load_task_model(artifact, task)(input_ids=ids[row:row + 1]).logits
        torch.testing.assert_close(out.logits[row:row + 1], want)


def test_auto_needs_the_tasks_validation_sets(artifact):
    with pytest.raises(ValueError, match="pass tasks="):
        engine.load(str(artifact), task="auto")
    with pytest.raises(ValueError, match="does not have"):
        engine.load(str(artifact), task="auto", tasks={**VALIDATION, "d": ["unknown task"]})

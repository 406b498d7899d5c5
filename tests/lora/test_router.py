"""TaskRouter on a hand-computable case: exact top-k, weights, adapter sums, fallback, persistence."""
import copy
import json
import math
import shutil

import pytest
import torch

from engine import TaskRouter
from engine.lora import AdapterPool, RoutingDecision, RoutingError, attach_adapters

from lora_helpers import LookupEncoder

TABLE = {
    "m1": [1, 0, 0], "m2": [1, 0, 0],      # math -> e1
    "c1": [0, 1, 0],                       # code -> e2
    "k1": [0, 0, 1],                       # cooking -> e3
    "a1": [1, 0, 0], "a2": [0, 1, 0],      # algebra -> (e1 + e2) / sqrt(2)
    "q-mixed": [1, 0.5, 0], "q-far": [0, 0, -1], "q-cook": [0, 0, 1],
}
TASKS = {"math": ["m1", "m2"], "code": ["c1"], "cooking": ["k1"], "algebra": ["a1", "a2"]}
MAPPING = {"math": "m", "code": "c", "algebra": "m"}  # cooking has no adapter


def _router(**kw):
    return TaskRouter.build(TASKS, encoder=LookupEncoder(TABLE), task_adapters=MAPPING, **kw)


def test_top_k_weights_and_shared_adapters_are_exact():
    (d,) = _router().route(["q-mixed"], k=3, temperature=0.2)
    norm = math.sqrt(1.25)
    sims = {"algebra": 1.5 / math.sqrt(2) / norm, "math": 1 / norm, "code": 0.5 / norm}
    assert d.tasks == ["algebra", "math", "code"]
    exp = [math.exp(s / 0.2) for s in sims.values()]
    weights = [e / sum(exp) for e in exp]
    assert d.weights == pytest.approx(weights, abs=1e-6) and sum(d.weights) == pytest.approx(1.0)
    assert d.adapters == pytest.approx({"m": weights[0] + weights[1], "c": weights[2]}, abs=1e-6)
    assert d.confidence == pytest.approx(sims["algebra"], abs=1e-6) and not d.fallback


def test_low_confidence_falls_back_to_base_and_adapterless_tasks_keep_a_base_share():
    far, cook = _router(min_confidence=0.5).route(["q-far", "q-cook"], k=2)
    assert far.fallback and far.adapters == {} and far.confidence == pytest.approx(0.0, abs=1e-6)
    assert cook.tasks[0] == "cooking" and not cook.fallback
    assert sum(cook.adapters.values()) == pytest.approx(cook.weights[1], abs=1e-6)  # cooking's share is base


def test_save_load_round_trip_and_json_audit(tmp_path):
    router = _router(k=2, temperature=0.5)
    router.add_task("extra", ["q-cook"], adapters="c")  # adding a task costs only its embeddings
    router.save(tmp_path / "r")
    loaded = TaskRouter.load(tmp_path / "r", encoder=LookupEncoder(TABLE))
    queries = ["q-mixed", "q-cook", "q-far"]
    assert [d.to_dict() for d in loaded.route(queries)] == [d.to_dict() for d in router.route(queries)]
    d = loaded.route(["q-cook"])[0]
    assert RoutingDecision.from_json(d.to_json()) == d and json.loads(d.to_json())["adapters"] == d.adapters
    with pytest.raises(RoutingError, match="built with encoder 'test/lookup'"):
        other = LookupEncoder(TABLE)
        other.name = "other"
        TaskRouter.load(tmp_path / "r", encoder=other)


def test_save_is_atomic_and_never_deletes_other_files(tmp_path, monkeypatch):
    import engine.lora.router as router_module

    first, second = _router(k=2), _router(k=3, temperature=0.7)
    first.save(tmp_path / "r")
    second.save(tmp_path / "r")  # a later save replaces the earlier one whole
    assert TaskRouter.load(tmp_path / "r", encoder=LookupEncoder(TABLE)).k == 3

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(router_module, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        first.save(tmp_path / "r")
    kept = TaskRouter.load(tmp_path / "r", encoder=LookupEncoder(TABLE))  # the complete earlier save remains
    assert (kept.k, kept.temperature) == (3, 0.7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary sibling is left behind
    monkeypatch.undo()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RoutingError, match="notes.txt"):
        first.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_bad_arguments():
    router = _router()
    with pytest.raises(RoutingError, match="temperature"):
        router.route(["q-mixed"], temperature=0)
    with pytest.raises(RoutingError, match="list of queries"):
        router.route("q-mixed")
    with pytest.raises(RoutingError, match="no validation examples"):
        TaskRouter.build({"t": []}, encoder=LookupEncoder(TABLE))


def test_router_from_task_folder_routes_through_the_api(llama, adapter_dirs, tmp_path):
    root = tmp_path / "tasks"
    for task, texts in {"math": ["m1", "m2"], "code": ["c1"], "cooking": ["k1"]}.items():
        (root / task).mkdir(parents=True)
        (root / task / "validation.jsonl").write_text("".join(json.dumps({"input": t}) + "\n" for t in texts))
    shutil.copytree(adapter_dirs["alpha"], root / "math" / "adapter")
    shutil.copytree(adapter_dirs["beta"], root / "code" / "adapter")
    router = TaskRouter.build(root, encoder=LookupEncoder(TABLE), k=2)
    assert isinstance(router.pool, AdapterPool) and sorted(router.pool) == ["code", "math"]
    lm = attach_adapters(copy.deepcopy(llama), router)
    assert lm.model.state_dict().keys() == llama.state_dict().keys()
    ids = torch.randint(3, 96, (2, 5))
    routed = lm(input_ids=ids, route="auto", queries=["q-mixed", "q-far"]).logits
    decisions = router.route(["q-mixed", "q-far"])
    assert decisions[1].fallback and set(decisions[0].adapters) == {"math", "code"}
    explicit = lm(input_ids=ids, adapter_weights=[d.adapters for d in decisions]).logits
    torch.testing.assert_close(routed, explicit, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(routed[1], llama(input_ids=ids[1:]).logits[0])

"""Tasks for routing: a name, a small validation set, and optionally the adapter(s) that serve it.

Validation examples are plain strings or JSON objects; the text that gets embedded is the object's "text",
"input", "question", "prompt" or "query" field (the first present). Objects may also carry an "output" (or
"target"/"answer") field, which the affinity matrix uses to score adapters by loss.

A task folder holds one sub-folder per task: `<task>/validation.jsonl`, optionally `<task>/adapter/` (a PEFT
LoRA folder, registered under the task's name) and `<task>/task.json` ({"adapters": {name: share}}).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.lora.errors import RoutingError

_TEXT_KEYS = ("text", "input", "question", "prompt", "query")
_TARGET_KEYS = ("output", "target", "answer")


@dataclass
class Task:
    name: str
    records: list  # strings or dicts, as given
    adapters: dict[str, float] = field(default_factory=dict)  # adapter -> share of this task's weight

    @property
    def texts(self) -> list[str]:
        return [example_text(r, self.name) for r in self.records]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(input, target) pairs for loss-based scoring; a bare string is its own target."""
        out = []
        for r in self.records:
            text = example_text(r, self.name)
            target = next((r[k] for k in _TARGET_KEYS if isinstance(r, Mapping) and k in r), "")
            out.append((text, str(target)))
        return out


def example_text(record, task: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, Mapping):
        for key in _TEXT_KEYS:
            if isinstance(record.get(key), str):
                return record[key]
    raise RoutingError(f"task {task!r}: example {str(record)[:80]!r} has none of the text fields {_TEXT_KEYS}")


def read_jsonl(path: str | Path, task: str) -> list:
    path = Path(path)
    if not path.is_file():
        raise RoutingError(f"task {task!r}: {path} does not exist")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RoutingError(f"task {task!r}: {path}:{n} is not valid JSON ({exc})") from exc
    return records


def normalise_adapters(spec, task: str) -> dict[str, float]:
    """None, a name, a list of names (equal shares) or a dict name -> share; shares are made to sum to 1."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        spec = {spec: 1.0}
    elif isinstance(spec, Sequence):
        spec = {name: 1.0 for name in spec}
    if not isinstance(spec, Mapping) or any(float(v) < 0 for v in spec.values()):
        raise RoutingError(f"task {task!r}: adapters must be a name, a list, or a dict name -> share >= 0")
    total = sum(float(v) for v in spec.values())
    if spec and total <= 0:
        raise RoutingError(f"task {task!r}: adapter shares sum to zero")
    return {name: float(v) / total for name, v in spec.items()}


def as_tasks(tasks) -> dict[str, Task]:
    """Accept a dict task -> (examples list | JSONL path | Task), or a task folder path."""
    if isinstance(tasks, (str, Path)):
        return load_task_folder(tasks)[0]
    if not isinstance(tasks, Mapping) or not tasks:
        raise RoutingError("tasks must be a non-empty dict task name -> validation examples, or a task folder")
    out = {}
    for name, value in tasks.items():
        if isinstance(value, Task):
            out[name] = value
        elif isinstance(value, (str, Path)):
            out[name] = Task(name, read_jsonl(value, name))
        elif isinstance(value, Sequence):
            out[name] = Task(name, list(value))
        else:
            raise RoutingError(f"task {name!r}: expected a list of examples or a JSONL path, got "
                               f"{type(value).__name__}")
        if not out[name].records:
            raise RoutingError(f"task {name!r} has no validation examples")
    return out


def load_task_folder(root: str | Path) -> tuple[dict[str, Task], dict[str, Path]]:
    """Read a task folder; returns (tasks, adapter folders found inside it, keyed by task name)."""
    root = Path(root)
    if not root.is_dir():
        raise RoutingError(f"task folder {root} does not exist")
    tasks, adapters = {}, {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        name = sub.name
        records = read_jsonl(sub / "validation.jsonl", name)
        if not records:
            raise RoutingError(f"task {name!r} has no validation examples in {sub / 'validation.jsonl'}")
        meta = json.loads((sub / "task.json").read_text()) if (sub / "task.json").is_file() else {}
        share = normalise_adapters(meta.get("adapters"), name)
        if (sub / "adapter").is_dir():
            adapters[name] = sub / "adapter"
            share = share or {name: 1.0}
        tasks[name] = Task(name, records, share)
    if not tasks:
        raise RoutingError(f"task folder {root} holds no task sub-folders")
    return tasks, adapters

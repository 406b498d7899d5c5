"""The merge configuration: a YAML file, command-line flags, or both (flags win).

```yaml
base: ./vit-base
models: {cars: ./vit-cars, dtd: {path: ./vit-dtd, weight: 0.8}}
method: ties
params: {density: 0.2, lambda: 1.0}
size: 2.25            # multiplier, byte budget ("800MB") or "all"
blocks: auto          # auto | clip | vit | bert | t5 | llama | mistral | qwen | [regex, ...]
out: ./merged
```
Relative paths are taken relative to the YAML file, so a config can travel with its checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml


@dataclass
class MergeSpec:
    base: str = ""
    models: dict[str, str] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    method: str = "task_arithmetic"
    params: dict = field(default_factory=dict)
    size: str | float = 1.0
    blocks: object = "auto"
    similarity: str = "cosine"
    out: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    plan: str | None = None
    overwrite: bool = False
    max_shard_size: str = "2GiB"
    base_hash: str | None = None
    max_relative_distance: float = 1.0


KEYS = {f.name for f in fields(MergeSpec)} - {"weights"}


def _resolve(root: Path, p: str) -> str:
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else root / path)


def load_spec(path: str | None, overrides: dict | None = None) -> MergeSpec:
    """Read the YAML (if any), apply non-None overrides, resolve paths, check the essentials."""
    raw: dict = {}
    root = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"merge config not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: a merge config must be a mapping, got {type(raw).__name__}")
        root = p.resolve().parent
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown config key(s) {unknown}; allowed: {sorted(KEYS)}")
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k == "models":
            raw.setdefault("models", {}).update(v)
        elif k == "params":
            raw["params"] = {**(raw.get("params") or {}), **v}
        else:
            raw[k] = v
            if k in ("base", "out", "plan"):
                raw[k] = str(Path(v).expanduser().resolve())
    spec = MergeSpec(**{k: v for k, v in raw.items() if k != "models"})
    if not raw.get("base"):
        raise ValueError("the merge needs a `base` checkpoint folder")
    spec.base = _resolve(root, raw["base"])
    models = raw.get("models") or {}
    if len(models) < 2:
        raise ValueError(f"the merge needs at least two fine-tuned `models`, got {len(models)}")
    for task, entry in models.items():
        if isinstance(entry, dict):
            if "path" not in entry:
                raise ValueError(f"model {task!r}: a mapping entry needs `path`")
            spec.models[str(task)] = _resolve(root, entry["path"])
            spec.weights[str(task)] = float(entry.get("weight", 1.0))
        else:
            spec.models[str(task)] = _resolve(root, str(entry))
    for key in ("out", "plan"):
        value = getattr(spec, key)
        if value is not None:
            setattr(spec, key, _resolve(root, value))
    return spec

"""The merge configuration: a YAML file, command-line flags, or both (flags win).

```yaml
base: ./vit-base
models: {cars: ./vit-cars, dtd: {path: ./vit-dtd, weight: 0.8, parameters: {density: 0.5}}}
method: ties
params: {density: 0.2, lambda: 1.0}
size: 2.25            # multiplier, byte budget ("800MB") or "all"
blocks: auto          # auto | clip | vit | bert | t5 | llama | mistral | qwen | [regex, ...]
out: ./merged
```
mergekit's own format is read as well (`merge_method`, `base_model`, `models: [{model, parameters}]`,
`parameters`, `dtype`, `tokenizer_source`), so a mergekit config runs unchanged. Relative paths are taken
relative to the YAML file, so a config can travel with its checkpoints; a model that is not a local
folder but looks like a hub id (`org/name`) is taken from the local Hugging Face cache.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from foundation.hub import resolve_hub_id


@dataclass
class MergeSpec:
    base: str = ""
    models: dict[str, str] = field(default_factory=dict)
    weights: dict[str, object] = field(default_factory=dict)
    model_params: dict[str, dict] = field(default_factory=dict)
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
    tokenizer_source: str | None = None
    # Random drops: "tessera" (a generator per task and tensor, the same whatever the grouping) or
    # "mergekit" (the stream mergekit draws from torch's generator seeded with `seed`, for an exact match).
    rng: str = "tessera"


KEYS = {f.name for f in fields(MergeSpec)} - {"weights", "model_params"}
MERGEKIT_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Methods for which mergekit keeps a `base_model` that is also listed in `models` as one of the inputs.
BASE_IS_INPUT = {"linear", "slerp", "model_stock", "nuslerp", "passthrough"}


def _resolve(root: Path, p: str) -> str:
    path = Path(p).expanduser()
    full = path if path.is_absolute() else root / path
    if not full.exists() and HUB_ID.match(str(p)) and not str(p).startswith("."):
        return str(resolve_hub_id(str(p)))
    return str(full)


def _task_name(ref: str, taken: set) -> str:
    name = Path(str(ref).rstrip("/")).name or str(ref)
    stem, i = name, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    return name


def from_mergekit(raw: dict) -> dict:
    """A mergekit config as tessera keys."""
    for key in ("slices", "modules"):
        if key in raw:
            raise ValueError(f"mergekit `{key}` (layer stacking) is not supported; list whole `models` instead")
    unknown = sorted(set(raw) - MERGEKIT_KEYS - KEYS)
    if unknown:
        raise ValueError(f"unknown mergekit config key(s) {unknown}; read: {sorted(MERGEKIT_KEYS)}")
    method = raw["merge_method"]
    entries = [e if isinstance(e, dict) else {"model": e} for e in raw.get("models") or []]
    base = raw.get("base_model")
    listed = [str(e["model"]) for e in entries]
    out = {k: v for k, v in raw.items() if k in KEYS and k not in ("models",)}
    out["method"], out["params"] = method, dict(raw.get("parameters") or {})
    if raw.get("out_dtype") or raw.get("dtype"):
        out["dtype"] = raw.get("out_dtype") or raw.get("dtype")
    if base is None:
        if not entries:
            raise ValueError("a mergekit config needs `models`")
        base = listed[0]  # linear/nuslerp without base: any base gives the same merge of the models
        if method == "nuslerp":
            out["params"]["nuslerp_on_weights"] = True
        elif method not in ("linear", "passthrough"):
            raise ValueError(f"mergekit method {method!r} needs `base_model`")
    models, taken = {}, set()
    if method in BASE_IS_INPUT and str(base) in listed:
        entries.sort(key=lambda e: str(e["model"]) != str(base))  # the base first: slerp's t = 0 end
    for e in entries:
        if str(e["model"]) == str(base) and method not in BASE_IS_INPUT:
            continue  # mergekit skips the base among the task vectors
        name = _task_name(e["model"], taken)
        taken.add(name)
        models[name] = {"path": str(e["model"]), "parameters": dict(e.get("parameters") or {})}
    out["base"], out["models"] = str(base), models
    return out


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
    if "merge_method" in raw:
        raw = from_mergekit(raw)
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
            local = Path(str(v)).expanduser()
            if k in ("base", "out", "plan") and (local.exists() or not HUB_ID.match(str(v))):
                raw[k] = str(local.resolve())  # flags are relative to the working directory
    spec = MergeSpec(**{k: v for k, v in raw.items() if k != "models"})
    if not raw.get("base"):
        raise ValueError("the merge needs a `base` checkpoint folder")
    spec.base = _resolve(root, raw["base"])
    models = raw.get("models") or {}
    if len(models) < (1 if spec.method == "passthrough" else 2):
        raise ValueError(f"the merge needs at least two fine-tuned `models`, got {len(models)}")
    for task, entry in models.items():
        task = str(task)
        if isinstance(entry, dict):
            if "path" not in entry:
                raise ValueError(f"model {task!r}: a mapping entry needs `path`")
            spec.models[task] = _resolve(root, entry["path"])
            params = dict(entry.get("parameters") or {})
            if "weight" in entry:
                params["weight"] = entry["weight"]
            if "weight" in params:
                spec.weights[task] = params.pop("weight")
            spec.model_params[task] = params
        else:
            spec.models[task] = _resolve(root, str(entry))
    for key in ("out", "plan"):
        value = getattr(spec, key)
        if value is not None:
            setattr(spec, key, _resolve(root, value))
    return spec


def check_out_apart(out, inputs) -> None:
    """`out` may not be, contain, or sit inside any input folder: replacing it would delete that input.
    Checked on resolved paths (symlinks followed) before anything is read or written."""
    if out is None:
        return
    o = Path(out).expanduser().resolve()
    for i in inputs:
        p = Path(i).expanduser().resolve()
        if o == p or p.is_relative_to(o) or o.is_relative_to(p):
            relation = "is" if o == p else ("contains" if p.is_relative_to(o) else "is inside")
            raise ValueError(f"output {o} {relation} the input {p}: writing there could destroy it "
                             "(choose an `out` outside every input, --overwrite or not)")

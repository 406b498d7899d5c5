"""The model registry shared by inference, merging and LoRA routing.

An entry names a model: its family, where its weights come from, and how to run it by default. Entries are
read from the YAML files in `configs/models/` and can be registered from code. `source` is one of:

- a local folder with `config.json` and safetensors weights;
- a Hugging Face hub id (`org/name`), resolved only through the local Hugging Face cache: tessera never
  downloads at run time, and a model missing from the cache is an error that says how to fetch it;
- `tiny`: a small model built from the family's tiny config (plus `options.config` overrides) with seeded
  random weights, for tests and demos; saved once as a checkpoint folder in the cache, then loaded like any;
- `builder:module:function`: a function that returns a local folder, built on first use and cached.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
STRATEGIES = ("single", "moeshard", "ep", "ep-capacity", "auto")


@dataclass
class ModelEntry:
    name: str
    family: str
    source: str
    dtype: str = "float32"
    backend: str | None = None
    model_class: str | None = None  # a transformers class name; default: the family's auto class
    description: str = ""
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        from engine.families import family_for

        family_for(self.family)  # fail early on an unknown family
        parse_dtype(self.dtype)


_REGISTRY: dict[str, ModelEntry] = {}
_ADAPTERS: dict[str, Path] = {}  # LoRA adapter name -> PEFT folder
_LOADED_DIRS: set[Path] = set()


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def register_model(entry: ModelEntry | None = None, **fields) -> ModelEntry:
    """Add an entry (a `ModelEntry`, or its fields as keywords); a later entry with the same name wins."""
    entry = entry or ModelEntry(**fields)
    _REGISTRY[entry.name] = entry
    return entry


def register_adapter(name: str, path) -> Path:
    """Name a PEFT LoRA folder, so `engine.load(base, adapters=[name, ...])` can use it by name."""
    _ADAPTERS[name] = Path(path).expanduser()
    return _ADAPTERS[name]


def get_adapter_path(name: str) -> Path:
    _ensure_defaults()
    if name not in _ADAPTERS:
        raise KeyError(f"unknown adapter {name!r}; registered adapters: {sorted(_ADAPTERS)}")
    return _ADAPTERS[name]


def load_config_dir(directory: Path | str = CONFIG_DIR) -> None:
    """Register every entry of every `*.yaml` file in `directory`: a file holds one model entry, or a `models`
    list and/or an `adapters` list of `{name, path}` (paths relative to the file)."""
    directory = Path(directory)
    for path in sorted(directory.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        for adapter in data.get("adapters", []):
            register_adapter(adapter["name"], path.parent / Path(adapter["path"]).expanduser())
        if "adapters" in data and "models" not in data:
            continue
        for fields in data.get("models", [data]):
            try:
                register_model(**fields)
            except TypeError as err:
                raise ValueError(f"{path}: bad model entry {fields.get('name', '?')!r}: {err}") from None
    _LOADED_DIRS.add(directory.resolve())


def _ensure_defaults() -> None:
    if CONFIG_DIR.resolve() not in _LOADED_DIRS:
        load_config_dir(CONFIG_DIR)


def list_models() -> list[ModelEntry]:
    _ensure_defaults()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_model_entry(name: str) -> ModelEntry:
    _ensure_defaults()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}: not a registered name, a local folder or a hub id. "
                       f"Registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot folder of a hub model, from the Hugging Face cache only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and tessera never downloads at run time. "
            f"Fetch it first, e.g. `hf download {repo_id}` (or `huggingface-cli download {repo_id}`), "
            "or pass a local folder") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model_class(family, class_name: str | None):
    import transformers

    name = class_name or family.auto_class
    if not hasattr(transformers, name):
        raise ValueError(f"transformers has no model class {name!r}")
    return getattr(transformers, name)


def build_tiny(family, options: dict, model_class, dtype: torch.dtype):
    """A small model of the family with seeded random weights (routers too: some families init them to 0)."""
    config = family.tiny_config(**options.get("config", {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.get("seed", 0))
        build = getattr(model_class, "from_config", None) or model_class._from_config  # Auto* or concrete class
        model = build(config, dtype=dtype)
        for _, _, _, block in family.find_blocks(model):
            router = getattr(block, "gate", None) or block.router.classifier
            torch.nn.init.normal_(router.weight, std=config.hidden_size ** -0.5)
    return model


def cache_dir() -> Path:
    return Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache" / "tessera"))


def materialize_tiny(entry: ModelEntry) -> Path:
    """Save a `tiny` entry's model once as a checkpoint folder in the cache (atomically) and return it."""
    from engine.families import family_for

    family = family_for(entry.family)
    key = json.dumps([entry.family, entry.model_class, entry.dtype, entry.options], sort_keys=True, default=str)
    folder = cache_dir() / "models" / f"{entry.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (folder / "config.json").exists():
        return folder
    model = build_tiny(family, entry.options, _model_class(family, entry.model_class), parse_dtype(entry.dtype))
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        model.save_pretrained(staging)
        os.replace(staging, folder)
    except OSError:
        if not (folder / "config.json").exists():  # not a concurrent writer that won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _resolve_source(entry: ModelEntry) -> Path:
    source = entry.source
    if source == "tiny":
        return materialize_tiny(entry)
    if source.startswith("builder:"):
        _, module, function = source.split(":", 2)
        return Path(getattr(importlib.import_module(module), function)())
    if Path(source).expanduser().exists():
        return Path(source).expanduser()
    return resolve_hub_id(source)


def _entry_for(name_or_path) -> tuple[ModelEntry | None, Path]:
    """(the registry entry, if any; the local checkpoint folder) for a folder, a registered name or a hub id."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return None, path
    _ensure_defaults()
    if name not in _REGISTRY and "/" in name and not path.exists() and not name.startswith((".", "/", "~")):
        return None, resolve_hub_id(name)
    entry = get_model_entry(name)  # a KeyError listing the registered names if it is none of them
    return entry, _resolve_source(entry)


def load(name_or_path, *, backend: str | None = None, dtype=None, device=None, capacity: str | None = None,
         strategy: str | None = None, task: str | None = None, tasks=None, adapters=None,
         adapter_options: dict | None = None, cuda_graphs: bool = False):
    """A ready model: weights loaded, MoE blocks on tessera's layer, eval mode.

    `name_or_path`: a registered name, a local folder (a Hugging Face checkpoint or a FlexMerge artifact), or a
    hub id already in the local cache. `backend`: "triton", "torch", "reference" or "eager" (Hugging Face's own
    modules). `capacity`: None (dropless) or "hf". `strategy` (under torchrun): "single", "moeshard", "ep",
    "ep-capacity" or "auto". `task`: the task of a FlexMerge artifact, or "auto" to route each query to its
    nearest task by `tasks` (task -> validation examples, a task folder, or a `TaskRouter`). `adapters`: LoRA
    adapters to attach (registered adapter names, a dict name -> PEFT folder, an `AdapterPool` or a
    `TaskRouter`), with `adapter_options` passed on to `engine.lora.attach_adapters` (tokenizer, cache_bytes,
    backend). `cuda_graphs`: generate() replays its decode steps from CUDA graphs, captured now for each batch
    bucket (`engine.moe.graphs`; one CUDA device, strategy "single").
    """
    from engine.families import family_for
    from engine.moe.patch import patch_moe

    entry, folder = _entry_for(name_or_path)
    if _is_merge_artifact(folder):
        from merge.artifact import load_task_model

        if task is None:
            raise ValueError(f"{folder} is a FlexMerge artifact: pass task=<name> to choose the task's model, "
                             "or task='auto' with tasks=<validation examples per task>")
        if task == "auto":
            from engine.lora.task_paths import load_task_routed

            if tasks is None:
                raise ValueError("task='auto' routes queries by the tasks' validation examples: pass tasks=")
            return load_task_routed(folder, tasks, dtype=dtype, device=device)
        return load_task_model(folder, task, dtype=dtype, device=device)
    dtype = parse_dtype(dtype or (entry.dtype if entry else "float32"))
    device = torch.device(device) if device is not None else default_device()
    backend = backend or (entry.backend if entry else None)
    strategy = strategy or "single"
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if cuda_graphs and (device.type != "cuda" or strategy != "single"):
        raise ValueError(f"cuda_graphs=True needs a CUDA device and strategy 'single', got {device} and "
                         f"{strategy!r} (ranks agree on token counts on the host before every pass)")

    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    family = family_for(entry.family if entry else config)
    model_class = _model_class(family, entry.model_class if entry else None)

    if strategy != "single":
        from engine.parallel import load_parallel

        model = load_parallel(folder, family, strategy=strategy, backend=backend, dtype=dtype, device=device,
                              capacity=capacity, model_class=model_class)
    else:
        extra = {"experts_implementation": "eager"} if backend == "eager" and family.uses_experts_interface else {}
        _check_weights_present(folder)
        model = model_class.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
        model = patch_moe(model.to(device).eval(), backend=backend, capacity=capacity)
    model.tessera_entry = entry
    if cuda_graphs:
        from engine.moe.graphs import capture_decode_buckets, enable_graphed_decode

        capture_decode_buckets(enable_graphed_decode(model))
    if adapters is not None:
        from engine.lora import attach_adapters

        if isinstance(adapters, (list, tuple)):  # registered adapter names
            adapters = {name: get_adapter_path(name) for name in adapters}
        return attach_adapters(model, adapters, **(adapter_options or {}))
    return model


def _is_merge_artifact(folder: Path) -> bool:
    try:
        from merge.artifact import is_artifact
    except ImportError:
        return False
    return is_artifact(folder)


def _check_weights_present(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"{folder} has no *.safetensors weights (tessera loads only safetensors, never "
                                f"pickle); found {found}")


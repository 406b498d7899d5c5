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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from foundation.cache import build_once, cache_dir, save_model
from foundation.dtypes import parse_dtype
from foundation.hub import resolve_hub_id

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def transformers_class(name: str, config=None):
    """The transformers model class called `name`: exported by transformers, or registered with an Auto class
    for `config`'s type (as tessera's own models are). None if there is none."""
    import transformers

    if hasattr(transformers, name):
        return getattr(transformers, name)
    for auto in (n for n in dir(transformers) if n.startswith("AutoModel")):
        try:
            found = getattr(transformers, auto)._model_mapping[type(config)]
        except (AttributeError, KeyError, ValueError):
            continue
        if found.__name__ == name:
            return found
    return None


def model_class(config, family, class_name: str | None = None, where: str = "the model entry"):
    """The class to build: the entry's `model_class`, else the first of config.json's `architectures`, else the
    family's default."""
    archs = getattr(config, "architectures", None) or []
    name = class_name or (archs[0] if archs else family.auto_class)
    found = transformers_class(name, config)
    if found is None:
        import transformers

        origin = "the entry's model_class" if class_name else f"{where}: architectures" if archs else "the family"
        raise ValueError(f"{origin} names model class {name!r}, which transformers {transformers.__version__} "
                         "does not have")
    return found


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


def materialize_tiny(entry: ModelEntry) -> Path:
    """Save a `tiny` entry's model once as a checkpoint folder in the cache (atomically) and return it."""
    from engine.families import family_for

    family = family_for(entry.family)
    if family.tiny_config is None:
        raise ValueError(f"model {entry.name!r}: family {family.name!r} has no tiny config to build from")
    # The key holds everything of the family that shapes the model (the whole resolved config, the class, the
    # blocks whose routers are seeded), so a changed family default never reuses a stale model.
    config = family.tiny_config(**entry.options.get("config", {})).to_dict()
    class_name = entry.model_class or family.auto_class
    key = json.dumps([entry.family, class_name, family.block_classes, entry.dtype, entry.options, config],
                     sort_keys=True, default=str)
    folder = cache_dir("models", f"{entry.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")

    def write(tmp: Path) -> None:
        save_model(build_tiny(family, entry.options, transformers_class(class_name), parse_dtype(entry.dtype)), tmp)

    return build_once(folder, write)


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

"""Adapter pool: PEFT LoRA folders checked once on registration, their weights read lazily on first use.

All adapters of a pool must share rank and adapted modules: the mixture kernel stacks them into one
[slots, r, in] tensor per module, which is what lets a batch mix any adapters in two launches. Scales
(alpha / r, or alpha / sqrt(r) with rsLoRA) may differ per adapter; they are folded into the routing weights.
Only safetensors files are read; pickled `adapter_model.bin` folders are refused.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.lora.errors import AdapterError
from foundation.dtypes import SAFETENSORS_DTYPES

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_MIXABLE = ("F32", "F16", "BF16")  # what the mixture kernel takes


@dataclass(frozen=True)
class AdapterSpec:
    """What the pool knows about one adapter without holding its weights."""

    name: str
    path: Path
    base_model: str | None
    rank: int
    alpha: float
    scale: float
    target_modules: frozenset[str]
    shapes: Mapping[str, tuple[int, int]]  # module path -> (in_features, out_features)
    dtype: torch.dtype


def _read_config(name: str, folder: Path) -> dict:
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"adapter {name!r}: {folder} has no adapter_config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter {name!r}: {cfg_path} is not valid JSON ({exc})") from exc
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type is {cfg.get('peft_type')!r}, only LORA is supported")
    if cfg.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA adapters are not supported by the mixture kernel")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterError(f"adapter {name!r}: per-module rank_pattern/alpha_pattern is not supported")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0:
        raise AdapterError(f"adapter {name!r}: rank r={rank!r} must be a positive integer")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise AdapterError(f"adapter {name!r}: lora_alpha={alpha!r} must be a positive number")
    return cfg


def _read_shapes(name: str, weights: Path, rank: int) -> tuple[dict[str, tuple[int, int]], torch.dtype]:
    """Read the safetensors header only: module shapes, rank consistency and dtype."""
    if not weights.is_file():
        raise AdapterError(f"adapter {name!r}: {weights.parent} has no adapter_model.safetensors "
                           "(pickled adapter_model.bin files are refused)")
    a_shapes, b_shapes, dtypes = {}, {}, set()
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                match = _KEY.match(key)
                if match is None:
                    raise AdapterError(f"adapter {name!r}: unsupported tensor {key!r} (only lora_A/lora_B "
                                       "weights of linear layers can be mixed)")
                sl = f.get_slice(key)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                if dtype not in _MIXABLE:
                    raise AdapterError(f"adapter {name!r}: tensor {key!r} has dtype {dtype}, expected F32/F16/BF16")
                dtypes.add(dtype)
                (a_shapes if match["ab"] == "A" else b_shapes)[match["module"]] = shape
    except AdapterError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise AdapterError(f"adapter {name!r}: cannot read {weights} ({exc})") from exc
    if not a_shapes or a_shapes.keys() != b_shapes.keys():
        raise AdapterError(f"adapter {name!r}: lora_A and lora_B tensors do not pair up in {weights}")
    if len(dtypes) > 1:
        raise AdapterError(f"adapter {name!r}: mixed dtypes {sorted(dtypes)} in {weights}")
    shapes = {}
    for module, (r_a, d_in) in a_shapes.items():
        d_out, r_b = b_shapes[module]
        if r_a != rank or r_b != rank:
            raise AdapterError(f"adapter {name!r}: module {module} has rank {r_a}/{r_b} but the config says r={rank}")
        shapes[module] = (d_in, d_out)
    return shapes, SAFETENSORS_DTYPES[dtypes.pop()]


def read_adapter(name: str, folder: str | Path) -> AdapterSpec:
    """Check a PEFT LoRA folder and describe it; raises AdapterError naming the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter {name!r}: {folder} is not a directory")
    cfg = _read_config(name, folder)
    shapes, dtype = _read_shapes(name, folder / "adapter_model.safetensors", cfg["r"])
    rank, alpha = cfg["r"], float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return AdapterSpec(name=name, path=folder, base_model=cfg.get("base_model_name_or_path") or None,
                       rank=rank, alpha=alpha, scale=scale, target_modules=frozenset(shapes),
                       shapes=shapes, dtype=dtype)


class AdapterPool:
    """Named LoRA adapters for one base model, with uniform rank and adapted modules."""

    def __init__(self, adapters: Mapping[str, str | Path] | None = None, *, base_model: str | None = None):
        self.base_model = base_model
        self._specs: dict[str, AdapterSpec] = {}
        self._host: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, folder in (adapters or {}).items():
            self.add(name, folder)

    def add(self, name: str, folder: str | Path) -> AdapterSpec:
        """Register one adapter folder after checking it against the pool."""
        if name in self._specs:
            raise AdapterError(f"adapter {name!r} is already in the pool")
        spec = read_adapter(name, folder)
        if self.base_model and spec.base_model and spec.base_model != self.base_model:
            raise AdapterError(f"adapter {name!r} was trained on base model {spec.base_model!r} but the pool "
                               f"serves {self.base_model!r}")
        if self._specs:
            first = next(iter(self._specs.values()))
            if spec.rank != first.rank:
                raise AdapterError(f"adapter {name!r} has rank {spec.rank} but the pool's adapters have rank "
                                   f"{first.rank}")
            if spec.target_modules != first.target_modules:
                extra = sorted(spec.target_modules ^ first.target_modules)[:4]
                raise AdapterError(f"adapter {name!r} adapts different modules than the pool's adapters "
                                   f"(e.g. {extra})")
            if dict(spec.shapes) != dict(first.shapes):
                raise AdapterError(f"adapter {name!r} has module shapes that differ from the pool's adapters")
        self._specs[name] = spec
        return spec

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> AdapterSpec:
        if name not in self._specs:
            raise AdapterError(f"unknown adapter {name!r}; the pool has {sorted(self._specs)[:8]}")
        return self._specs[name]

    @property
    def rank(self) -> int:
        return self._first().rank

    @property
    def shapes(self) -> Mapping[str, tuple[int, int]]:
        return self._first().shapes

    def _first(self) -> AdapterSpec:
        if not self._specs:
            raise AdapterError("the adapter pool is empty")
        return next(iter(self._specs.values()))

    def host_weights(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module path -> (A [r, in], B [out, r]) on the host, read on first use."""
        if name not in self._host:
            spec = self.spec(name)
            try:
                tensors = load_file(str(spec.path / "adapter_model.safetensors"))
            except Exception as exc:
                raise AdapterError(f"adapter {name!r}: cannot load weights ({exc})") from exc
            weights = {}
            for key, tensor in tensors.items():
                match = _KEY.match(key)
                if not torch.isfinite(tensor).all():
                    raise AdapterError(f"adapter {name!r}: tensor {key!r} holds NaN or inf")
                pair = weights.setdefault(match["module"], [None, None])
                pair[0 if match["ab"] == "A" else 1] = tensor
            self._host[name] = {m: (a, b) for m, (a, b) in weights.items()}
        return self._host[name]

    def paths(self) -> dict[str, str]:
        return {name: str(spec.path.resolve()) for name, spec in self._specs.items()}

    def check_model(self, model: torch.nn.Module) -> None:
        """Every adapted module must be an nn.Linear of the adapter's shape in `model`, and each adapter's
        base model must be one of the model's names (unless the pool was given an explicit `base_model`)."""
        names = model_names(model)
        for spec in self._specs.values():
            if self.base_model is None and names and spec.base_model and \
                    not (_aliases(spec.base_model) & names):
                raise AdapterError(f"adapter {spec.name!r} was trained on {spec.base_model!r} but the model is "
                                   f"{sorted(names)[0]!r}; if they are the same model, build "
                                   f"AdapterPool(..., base_model={spec.base_model!r}) to say so")
        for module, (d_in, d_out) in self.shapes.items():
            try:
                layer = model.get_submodule(module)
            except AttributeError as exc:
                raise AdapterError(f"the adapters adapt {module!r}, which the model does not have") from exc
            if not isinstance(layer, torch.nn.Linear):
                raise AdapterError(f"{module!r} is a {type(layer).__name__}; LoRA mixing needs nn.Linear")
            if (layer.in_features, layer.out_features) != (d_in, d_out):
                raise AdapterError(f"{module!r} is {layer.in_features}->{layer.out_features} in the model but "
                                   f"{d_in}->{d_out} in the adapters (wrong base model?)")


def _aliases(name: str) -> set[str]:
    """A model name plus the hub id hidden in a Hugging Face cache path (.../models--org--name/...)."""
    out = {name.rstrip("/")}
    for part in Path(name).parts:
        if part.startswith("models--"):
            out.add(part[len("models--"):].replace("--", "/"))
    return out


def model_names(model: torch.nn.Module) -> set[str]:
    """Every name the model is known by: its config's name_or_path and its registry entry's name and source."""
    names = set()
    config_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    entry = getattr(model, "tessera_entry", None)
    for name in (config_name, getattr(entry, "name", None), getattr(entry, "source", None)):
        if name:
            names |= _aliases(str(name))
    return names

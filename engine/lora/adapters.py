"""Adapter pool: PEFT LoRA folders checked fully on registration (config, tensor names and shapes, finite
values), their weights read again lazily on first use.

A pool mixes adapters as public pools have them: any ranks (the device cache pads every module to the
pool's largest rank for it, with zeros, so the padding adds exact zeros), any target modules (a module an
adapter does not adapt is an all-zero slot with scale 0, which adds exact zeros), `rank_pattern`,
`alpha_pattern` and `use_rslora` (each module's LoRA scale is kept per adapter and per module and folded into
the routing weights of that module). Adapters trained with `target_parameters` on stacked MoE expert
parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) are read per expert; see `engine.lora.experts`.

Refused, with the adapter and the field named: DoRA (`use_dora`), embedding LoRA (`lora_embedding_A/B`),
`modules_to_save`, trainable tokens, LoRA biases, `fan_in_fan_out`, non-LORA PEFT types, rank 0, pickled
`adapter_model.bin` folders, and tensors holding NaN or inf.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.lora.errors import AdapterError
from foundation.dtypes import SAFETENSORS_DTYPES
from foundation.io import read_header

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?P<nested>(?:\.base_layer)*)"
                  r"\.lora_(?P<ab>[AB])\.weight$")
_MIXABLE = ("F32", "F16", "BF16")  # what the mixture kernels take
# Config fields whose non-default values change what the saved tensors mean in ways the mixture cannot apply.
_REFUSED_FIELDS = {
    "use_dora": "DoRA adapters (use_dora) rescale the merged weight per column, which a per-row output mixture "
                "cannot apply",
    "modules_to_save": "modules_to_save replaces whole modules, which cannot be mixed per row",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices) cannot be mixed per row",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers) is not supported",
    "layer_replication": "layer_replication changes the base model's layers",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
}


def pattern_value(patterns: Mapping[str, float], module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module path
    (as a regex, on a dot boundary) gives the value."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class ModuleLoRA:
    """One adapted linear module (or one stacked expert parameter) of one adapter."""

    rank: int
    scale: float
    d_in: int
    d_out: int
    num_experts: int = 0  # 0: an nn.Linear; E: an (E, out, in) expert parameter with E pairs of A and B


@dataclass(frozen=True)
class AdapterSpec:
    """What the pool knows about one adapter without holding its weights."""

    name: str
    path: Path
    base_model: str | None
    rank: int  # the largest rank of any of its modules
    alpha: float
    modules: Mapping[str, ModuleLoRA]  # linear module path -> its LoRA
    experts: Mapping[str, ModuleLoRA]  # "<experts module>.<parameter>" -> its per-expert LoRA
    dtype: torch.dtype

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: (lora.d_in, lora.d_out) for m, lora in self.modules.items()}


def _read_config(name: str, folder: Path) -> dict:
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"adapter {name!r}: {folder} has no adapter_config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter {name!r}: {cfg_path} is not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {name!r}: {cfg_path} does not hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type is {cfg.get('peft_type')!r}, only LORA is supported")
    for field, why in _REFUSED_FIELDS.items():
        if cfg.get(field):
            raise AdapterError(f"adapter {name!r}: field {field}={cfg[field]!r} is refused: {why}")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: field bias={cfg['bias']!r} is refused: trained base biases cannot "
                           "be mixed per row")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise AdapterError(f"adapter {name!r}: field r={rank!r} must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"adapter {name!r}: field lora_alpha={alpha!r} must be a positive number")
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(field) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"adapter {name!r}: field {field} must be a dict pattern -> value")
        for key, value in patterns.items():
            integral = field == "rank_pattern"
            ok = isinstance(value, int) if integral else isinstance(value, (int, float)) and math.isfinite(value)
            if isinstance(value, bool) or not ok or value <= 0:
                raise AdapterError(f"adapter {name!r}: field {field}[{key!r}]={value!r} must be a positive "
                                   f"{'integer' if integral else 'number'}")
    return cfg


def _module_scale(cfg: dict, module: str) -> tuple[int, float]:
    """(rank, scale) of one module: rank_pattern/alpha_pattern first, then r/lora_alpha; rsLoRA uses sqrt(r)."""
    rank = pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
    alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
    return rank, alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _read_header(name: str, weights: Path) -> tuple[dict[str, dict[str, tuple]], torch.dtype]:
    """Tensor names and shapes from the checked safetensors header: {key prefix: {"A": shape, "B": shape}},
    dtype."""
    if not weights.is_file():
        raise AdapterError(f"adapter {name!r}: {weights.parent} has no adapter_model.safetensors "
                           "(pickled adapter_model.bin files are refused)")
    try:
        header, _ = read_header(weights)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: cannot read {weights} ({exc})") from exc
    for key in header:
        if "lora_embedding_" in key:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is embedding LoRA (lora_embedding_A/B), "
                               "which is refused: only linear layers and stacked expert parameters mix")
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is a DoRA magnitude (use_dora), which is refused")
    pairs: dict[str, dict[str, tuple]] = {}
    for key, h in header.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"adapter {name!r}: unsupported tensor {key!r} (only lora_A/lora_B "
                               "weights of linear layers and expert parameters can be mixed)")
        shape = tuple(h["shape"])
        if h["dtype"] not in _MIXABLE:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} has dtype {h['dtype']}, expected F32/F16/BF16")
        if len(shape) != 2:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} has shape {shape}, expected 2-D")
        pairs.setdefault(match["module"] + match["nested"], {})[match["ab"]] = shape
    if not pairs:
        raise AdapterError(f"adapter {name!r}: {weights} holds no LoRA tensors")
    unpaired = sorted(p for p, ab in pairs.items() if len(ab) != 2)
    if unpaired:
        raise AdapterError(f"adapter {name!r}: lora_A and lora_B tensors do not pair up for {unpaired[:4]}")
    dtypes = sorted({h["dtype"] for h in header.values()})
    if len(dtypes) > 1:
        raise AdapterError(f"adapter {name!r}: mixed dtypes {dtypes} in {weights}")
    return pairs, SAFETENSORS_DTYPES[dtypes[0]]


def _read_modules(name: str, cfg: dict, pairs: dict[str, dict[str, tuple]]):
    """Split the tensor pairs into linear modules and per-expert parameters, with ranks, scales and shapes."""
    targets = sorted({t.rpartition(".")[2] for t in cfg.get("target_parameters") or []})
    target_paths = [t.rpartition(".")[0] for t in cfg.get("target_parameters") or []]
    modules, experts = {}, {}
    by_experts_module: dict[str, list[tuple[str, tuple, tuple]]] = {}
    for prefix, ab in pairs.items():
        (r_a, d_in), (d_out, r_b) = ab["A"], ab["B"]
        module = prefix.replace(".base_layer", "")
        is_param = ".base_layer" in prefix or any(module == p or module.endswith("." + p) for p in target_paths if p)
        if is_param and targets:
            by_experts_module.setdefault(module, []).append((prefix, (r_a, d_in), (d_out, r_b)))
            continue
        rank, scale = _module_scale(cfg, module)
        if r_a != rank or r_b != rank:
            raise AdapterError(f"adapter {name!r}: module {module} has rank {r_a}/{r_b} but the config says "
                               f"r={rank}")
        modules[module] = ModuleLoRA(rank, scale, d_in, d_out)
    for module, entries in by_experts_module.items():
        rank, scale = _module_scale(cfg, module)
        params = _name_expert_parameters(name, module, targets, entries)
        for (prefix, (r_a, d_in), (d_out, r_b)), param in zip(entries, params):
            if r_a != r_b or r_a % rank:
                raise AdapterError(f"adapter {name!r}: {module}.{param} has {r_a}/{r_b} LoRA rows, not a multiple "
                                   f"of r={rank} (one rank-r pair per expert)")
            experts[f"{module}.{param}"] = ModuleLoRA(rank, scale, d_in, d_out, num_experts=r_a // rank)
    return modules, experts


def _name_expert_parameters(name, module, targets, entries) -> list[str]:
    """gate_up_proj maps hidden -> 2F and down_proj maps F -> hidden, so with both present the gate_up entry
    is the one whose input width is the other's output width."""
    if len(entries) == 1 and len(targets) == 1:
        return targets
    if len(entries) == 2 and set(targets) == {"gate_up_proj", "down_proj"}:
        (_, (_, in0), (out0, _)), (_, (_, in1), (out1, _)) = entries
        if in0 == out1 and in1 * 2 == out0:
            return ["gate_up_proj", "down_proj"]
        if in1 == out0 and in0 * 2 == out1:
            return ["down_proj", "gate_up_proj"]
    raise AdapterError(f"adapter {name!r}: cannot tell which stacked parameters of {module} its tensors adapt "
                       f"(target_parameters {targets}); supported: gate_up_proj and/or down_proj")


def read_adapter(name: str, folder: str | Path) -> AdapterSpec:
    """Check a PEFT LoRA folder and describe it; raises AdapterError naming the adapter and the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter {name!r}: {folder} is not a directory")
    cfg = _read_config(name, folder)
    pairs, dtype = _read_header(name, folder / "adapter_model.safetensors")
    modules, experts = _read_modules(name, cfg, pairs)
    rank = max(m.rank for m in [*modules.values(), *experts.values()])
    return AdapterSpec(name=name, path=folder, base_model=cfg.get("base_model_name_or_path") or None,
                       rank=rank, alpha=float(cfg["lora_alpha"]), modules=modules, experts=experts, dtype=dtype)


def read_weights(spec: AdapterSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A [r, in], B [out, r]) for linear modules, and "<experts>.<param>" -> (A [E, r, in],
    B [E, out, r]) for expert parameters (PEFT stores A rows expert-major and B columns rank-major)."""
    try:
        tensors = load_file(str(spec.path / "adapter_model.safetensors"))
    except Exception as exc:
        raise AdapterError(f"adapter {spec.name!r}: cannot load weights ({exc})") from exc
    pairs: dict[str, list] = {}
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter {spec.name!r}: tensor {key!r} holds NaN or inf")
        match = _KEY.match(key)
        pairs.setdefault(match["module"] + match["nested"], [None, None])[0 if match["ab"] == "A" else 1] = tensor
    out = {}
    expert_keys = {}
    for key, lora in spec.experts.items():
        expert_keys.setdefault(key.rpartition(".")[0], []).append((key, lora))
    for prefix, (a, b) in pairs.items():
        module = prefix.replace(".base_layer", "")
        if module in spec.modules:
            out[module] = (a, b)
            continue
        key, lora = next((k, lo) for k, lo in expert_keys[module] if (lo.d_in, lo.d_out) == (a.shape[1], b.shape[0]))
        e, r = lora.num_experts, lora.rank
        out[key] = (a.reshape(e, r, lora.d_in), b.reshape(lora.d_out, r, e).permute(2, 0, 1).contiguous())
    return out


class AdapterPool:
    """Named LoRA adapters for one base model; ranks and target modules may differ between adapters."""

    def __init__(self, adapters: Mapping[str, str | Path] | None = None, *, base_model: str | None = None):
        self.base_model = base_model
        self._specs: dict[str, AdapterSpec] = {}
        self._host: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.version = 0  # bumped on every add/remove, so caches and models know to follow
        for name, folder in (adapters or {}).items():
            self.add(name, folder)

    def check(self, name: str, folder: str | Path) -> AdapterSpec:
        """Everything `add` checks, without changing the pool."""
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter names must be non-empty strings, got {name!r}")
        if name in self._specs:
            raise AdapterError(f"adapter {name!r} is already loaded (from {self._specs[name].path})")
        spec = read_adapter(name, folder)
        if self.base_model and spec.base_model and spec.base_model != self.base_model:
            raise AdapterError(f"adapter {name!r} was trained on base model {spec.base_model!r} but the pool "
                               f"serves {self.base_model!r}")
        for kind, table in (("module", self.shapes), ("expert parameter", self.expert_shapes)):
            mine = spec.shapes if kind == "module" else {k: (v.num_experts, v.d_in, v.d_out)
                                                         for k, v in spec.experts.items()}
            for module, shape in mine.items():
                if module in table and table[module] != shape:
                    raise AdapterError(f"adapter {name!r}: {kind} {module} has shape {shape} but the pool's "
                                       f"adapters have {table[module]} (another base model?)")
        read_weights(spec)  # finite values, readable file: fail now, not in a running batch
        return spec

    def add(self, name: str, folder: str | Path) -> AdapterSpec:
        """Register one adapter folder after checking it against the pool."""
        spec = self.check(name, folder)
        self.add_spec(spec)
        return spec

    def add_spec(self, spec: AdapterSpec) -> None:
        """Register an adapter that `check` accepted."""
        if spec.name in self._specs:
            raise AdapterError(f"adapter {spec.name!r} is already loaded (from {self._specs[spec.name].path})")
        self._specs[spec.name] = spec
        self.version += 1

    def remove(self, name: str) -> None:
        self.spec(name)
        del self._specs[name]
        self._host.pop(name, None)
        self.version += 1

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
        """The largest rank in the pool (every module is padded to at most this)."""
        if not self._specs:
            raise AdapterError("the adapter pool is empty")
        return max(s.rank for s in self._specs.values())

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Every linear module any adapter adapts -> (in_features, out_features)."""
        return {m: shape for s in self._specs.values() for m, shape in s.shapes.items()}

    @property
    def expert_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Every expert parameter any adapter adapts -> (experts, in, out)."""
        return {k: (v.num_experts, v.d_in, v.d_out) for s in self._specs.values() for k, v in s.experts.items()}

    def module_ranks(self) -> dict[str, int]:
        """Linear module or expert parameter -> the largest rank any adapter has for it (the padded rank)."""
        ranks: dict[str, int] = {}
        for s in self._specs.values():
            for m, lora in [*s.modules.items(), *s.experts.items()]:
                ranks[m] = max(ranks.get(m, 0), lora.rank)
        return ranks

    def host_weights(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module path -> (A, B) on the host (see `read_weights`), read on first use."""
        if name not in self._host:
            self._host[name] = read_weights(self.spec(name))
        return self._host[name]

    def paths(self) -> dict[str, str]:
        return {name: str(spec.path.resolve()) for name, spec in self._specs.items()}

    def check_model(self, model: torch.nn.Module, specs: list[AdapterSpec] | None = None) -> None:
        """Every adapted module must be an nn.Linear of the adapter's shape in `model` and every adapted expert
        parameter an (E, out, in) tensor; each adapter's base model must be one of the model's names (unless
        the pool was given an explicit `base_model`)."""
        names = model_names(model)
        for spec in self._specs.values() if specs is None else specs:
            if self.base_model is None and names and spec.base_model and not (_aliases(spec.base_model) & names):
                raise AdapterError(f"adapter {spec.name!r} was trained on {spec.base_model!r} but the model is "
                                   f"{sorted(names)[0]!r}; if they are the same model, build "
                                   f"AdapterPool(..., base_model={spec.base_model!r}) to say so")
            for module, lora in spec.modules.items():
                layer = _submodule(model, module, spec.name)
                if not isinstance(layer, torch.nn.Linear):
                    raise AdapterError(f"adapter {spec.name!r}: {module!r} is a {type(layer).__name__}; LoRA "
                                       "mixing needs nn.Linear")
                if (layer.in_features, layer.out_features) != (lora.d_in, lora.d_out):
                    raise AdapterError(f"adapter {spec.name!r}: {module!r} is {layer.in_features}->"
                                       f"{layer.out_features} in the model but {lora.d_in}->{lora.d_out} in the "
                                       "adapter (wrong base model?)")
            for key, lora in spec.experts.items():
                module, _, param = key.rpartition(".")
                experts = _submodule(model, module, spec.name)
                weight = getattr(experts, param, None)
                shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.dim() == 3 else \
                    _distributed_expert_shape(model, module, param)
                if shape is None:
                    raise AdapterError(f"adapter {spec.name!r}: {module!r} has no stacked 3-D parameter {param!r}")
                if getattr(experts, "is_transposed", False):
                    raise AdapterError(f"adapter {spec.name!r}: {module!r} stores its experts transposed, which "
                                       "expert LoRA does not support")
                if shape != (lora.num_experts, lora.d_out, lora.d_in):
                    raise AdapterError(f"adapter {spec.name!r}: {key!r} is {shape} in the model but "
                                       f"the adapter was trained on {(lora.num_experts, lora.d_out, lora.d_in)} "
                                       "(wrong base model?)")


def _distributed_expert_shape(model: torch.nn.Module, module: str, param: str) -> tuple[int, int, int] | None:
    """The whole (E, out, in) shape of `param` of an experts module whose MoE block a distributed strategy
    (`engine.parallel`) replaced by this rank's part, or None: the full tensors are gone, the part knows them."""
    block = model.get_submodule(module.rpartition(".")[0]) if "." in module else model
    part = getattr(block, "moeshard_part", None) or getattr(block, "ep_part", None)
    if part is None:
        return None
    first = 2 * part.ffn_width if part.w13 is not None else part.ffn_width
    hidden = part.w2.shape[1]
    return {"gate_up_proj": (part.num_experts, first, hidden),
            "down_proj": (part.num_experts, hidden, part.ffn_width)}.get(param)


def _submodule(model: torch.nn.Module, module: str, adapter: str) -> torch.nn.Module:
    try:
        return model.get_submodule(module)
    except AttributeError as exc:
        from engine.moe.layer import MoEBlock

        parts = module.split(".")
        for end in range(len(parts) - 1, 0, -1):  # the deepest part of the path that the model has
            try:
                owner = model.get_submodule(".".join(parts[:end]))
            except AttributeError:
                continue
            if isinstance(owner, MoEBlock):  # e.g. Hugging Face Switch's experts.expert_3.wi
                raise AdapterError(f"adapter {adapter!r} adapts {module!r}, one expert's layer of the MoE block "
                                   f"{'.'.join(parts[:end])!r}, which tessera runs as stacked expert weights: "
                                   "LoRA on single experts' linear layers is not supported; adapt the "
                                   "attention or dense layers, or stacked expert parameters (PEFT's "
                                   "target_parameters)") from exc
            break
        raise AdapterError(f"adapter {adapter!r} adapts {module!r}, which the model does not have "
                           "(wrong base model?)") from exc


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

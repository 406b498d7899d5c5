"""The merge-operator interface and its registry.

Every algorithm sees the task vectors of ONE block for the tasks of ONE group, stacked on dim 0
(`{tensor_name: Tensor[K, ...]}`), and returns a `MergeResult`: one unified task vector per tensor plus
optional per-task modulators (masks, scales). Keeping the operator this narrow is what lets FlexMerge
recompute any group of any block with any algorithm, and lets a new algorithm be one small file that
calls `register`.
"""
from __future__ import annotations

import hashlib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import torch

from merge.sparsify import bernoulli_keep_, drop_and_rescale_, rescaled_, trim


@dataclass
class MergeResult:
    """Unified task vector per tensor; optional masks `[K, ...] bool` and scales `[K]` per tensor.

    Task k of the group is rebuilt as `θ_0 + scales[k] · (masks[k] ⊙ vector)` (a missing modulator is 1).
    """

    vector: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] | None = None
    scales: dict[str, torch.Tensor] | None = None

    def task_vector(self, k: int, name: str) -> torch.Tensor:
        v = self.vector[name]
        if self.masks is not None:
            v = v * self.masks[name][k]
        if self.scales is not None:
            v = v * self.scales[name][k]
        return v


@dataclass
class Context:
    """What an algorithm may need besides the task vectors.

    `weights` are the per-task `weight` parameters of the group's members, `thresholds` the per-task
    magnitude thresholds for `scope: global` (computed over the whole model in the statistics pass),
    `rng(k, name)` a generator that is the same for task k and tensor `name` whatever group k is in, so
    random drops (DARE) do not change when groups are recomputed.
    """

    params: dict
    weights: torch.Tensor
    thresholds: torch.Tensor | None = None
    rng: Callable[[int, str], torch.Generator] | None = None
    # Per-model parameters (mergekit's `parameters:` under a model: density, gamma, epsilon, scale), one
    # value per member of the group; a parameter missing here falls back to `params`.
    task_params: dict[str, list] | None = None
    # The block's pretrained tensors (float32), for methods defined on whole weights (slerp, passthrough).
    base: dict[str, torch.Tensor] | None = None
    # A method's `stats` summed over the whole of each tensor, when `fn` is given only some of its rows.
    stats: dict[str, torch.Tensor] | None = None

    def value(self, name: str, k: int):
        """Parameter `name` for member k: its per-model value if it has one, else the method's."""
        if self.task_params is not None and self.task_params.get(name) is not None:
            v = self.task_params[name][k]
            if v is not None:
                return v
        return self.params[name]


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[dict[str, torch.Tensor], Context], MergeResult]
    defaults: dict
    masks: bool = False
    scales: bool = False
    # For methods whose result is Σ_k c_k τ_k: the coefficients c for a group. Lets the size curve merge
    # all groups of a block in one matrix product and get their errors from the Gram matrix.
    coefficients: Callable[[Context], torch.Tensor] | None = None
    # A per-task step that does not depend on the group (trimming, random drops): run once per block for
    # all tasks, not once per group, and `fn` then combines the prepared vectors.
    prepare: Callable[[dict[str, torch.Tensor], Context], dict[str, torch.Tensor]] | None = None
    # The method changes even a group of one model (passthrough's `scale`), so singletons go through it.
    singletons: bool = False
    # `fn` gives each row range (along dim 0) of a tensor from the same rows of the inputs, once it has the
    # tensor's `stats`: the write pass then streams tensors a few rows at a time. True, or a test on params.
    by_rows: bool | Callable[[dict], bool] = False
    # Per-tensor float64 sums that `fn` needs from the whole tensor (norms, dot products), computed on any
    # rows and added over row ranges; `fn` computes them itself when `Context.stats` lacks them.
    stats: Callable[[dict[str, torch.Tensor], Context], dict[str, torch.Tensor]] | None = None

    @property
    def modulated(self) -> bool:
        return self.masks or self.scales

    def rows_apart(self, params: dict) -> bool:
        """Whether `fn` (and `prepare`, a tensor at a time) can run tensor by tensor and row range by range."""
        if params.get("scope", "tensor") == "block" or self.modulated:
            return False
        return bool(self.by_rows(params) if callable(self.by_rows) else self.by_rows)


# Parameters every method accepts: per-task weights, DARE preprocessing and the seed of its drops.
COMMON_PARAMS = {"weight": 1.0, "dare": None, "seed": 0}

_REGISTRY: dict[str, Method] = {}


def register(name: str, *, defaults: dict | None = None, masks: bool = False, scales: bool = False,
             coefficients=None, prepare=None, singletons: bool = False, by_rows=False, stats=None):
    """Decorator: `@register("ties", defaults={"density": 0.2, "lambda": 1.0}, prepare=trim_tasks)`."""

    def wrap(fn):
        if name in _REGISTRY:
            raise RuntimeError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = Method(name, fn, dict(defaults or {}), masks, scales, coefficients, prepare, singletons,
                                 by_rows, stats)
        return fn

    return wrap


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown merge method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def resolve_params(method: Method, params: dict | None) -> dict:
    """Defaults overlaid with the user's params; unknown names are an error, not silently ignored."""
    params = dict(params or {})
    allowed = {**COMMON_PARAMS, **method.defaults}
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"method {method.name!r} has no parameter(s) {unknown}; it takes {sorted(allowed)}")
    return {**allowed, **params}


def seeded_rng(seed: int, block: str, task_names: list[str]) -> Callable[[int, str], torch.Generator]:
    """A generator per (task, tensor) derived from names only, so drops are reproducible and group-free."""

    def rng(k: int, name: str) -> torch.Generator:
        key = f"{seed}/{block}/{task_names[k]}/{name}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)

    return rng


# The methods whose drops mergekit draws from torch's global generator, one 32-bit draw per entry.
MERGEKIT_RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")


def mergekit_states(seed: int, draws: list[tuple[str, str, int]]) -> dict[tuple[str, str], torch.Tensor]:
    """The state of torch's CPU generator, seeded with `seed` (mergekit's `--random-seed`), at the start of
    each (tensor, task)'s drops, where `draws` lists (tensor, task, entries) in the order mergekit draws:
    tensors by name (its scheduler orders tasks by tensor name), each tensor's models in config order.

    Each entry takes one 32-bit draw (a uniform float32, see `sparsify.bernoulli_keep_`), whatever its
    probability, so the stream is advanced past a tensor by drawing that many uniforms, in chunks into one
    buffer: a pass of draws over the model at a quarter of the cost of mergekit's bernoulli draws."""
    g = torch.Generator().manual_seed(seed)
    states, scratch = {}, torch.empty(1 << 20)
    for name, task, numel in draws:
        states[(name, task)] = g.get_state()
        for start in range(0, numel, scratch.numel()):
            scratch[: min(scratch.numel(), numel - start)].uniform_(generator=g)
    return states


def mergekit_rng(states: dict[tuple[str, str], torch.Tensor], task_names: list[str]) -> Callable[[int, str], torch.Generator]:
    """Generators placed where mergekit's global generator is when it drops task k's entries of `name`."""

    def rng(k: int, name: str) -> torch.Generator:
        g = torch.Generator()
        g.set_state(states[(name, task_names[k])])
        return g

    return rng


def prepare(method: Method, tvs: dict[str, torch.Tensor], ctx: Context, in_place: bool = False) -> dict[str, torch.Tensor]:
    """The per-task, group-independent part: float32, DARE drop-and-rescale when `dare` is set, then the
    method's own `prepare`. Row k of the result depends only on task k, so preparing all tasks of a block
    once and selecting a group's rows equals preparing the group. The preparations work in place; unless
    `in_place`, they get a copy and `tvs` is left as it was."""
    density = ctx.params.get("dare")
    if method.prepare is None and density is None:
        return {n: t.float() for n, t in tvs.items()}
    tvs = {n: t.float() if t.dtype != torch.float32 else t if in_place else t.clone() for n, t in tvs.items()}
    if density is not None:
        tvs = drop_tasks(tvs, float(density), ctx)
    return method.prepare(tvs, ctx) if method.prepare is not None else tvs


def apply(method: Method, tvs: dict[str, torch.Tensor], ctx: Context) -> MergeResult:
    """Run `method` on a group's task vectors: prepare, then combine."""
    return method.fn(prepare(method, tvs, ctx), ctx)


def drop_tasks(tvs: dict[str, torch.Tensor], density: float, ctx: Context) -> dict[str, torch.Tensor]:
    """DARE on every task's tensors, in place, each with its own (task, tensor) generator."""
    if ctx.rng is None:
        raise RuntimeError("DARE needs a random generator in the merge context")
    for n, t in tvs.items():
        for k in range(t.shape[0]):
            drop_and_rescale_(t[k], density, ctx.rng(k, n))
    return tvs


def densities(tvs: dict[str, torch.Tensor], ctx: Context) -> list[float]:
    K = next(iter(tvs.values())).shape[0]
    return [float(ctx.value("density", k)) for k in range(K)]


def trim_tasks(tvs: dict[str, torch.Tensor], ctx: Context, at_least_one: bool = False) -> dict[str, torch.Tensor]:
    """Magnitude trimming to each task's top `density` (per model where given), within `scope`, equal
    magnitudes at the cut broken by `tie_break` (see `sparsify.magnitude_trim_`)."""
    d = densities(tvs, ctx)
    scope = ctx.params.get("scope", "tensor")
    rule = ctx.params.get("tie_break") or "mergekit"
    if len(set(d)) == 1 or scope == "global":
        return trim(tvs, d[0], scope, ctx.thresholds, rule, at_least_one)
    if scope == "tensor":  # row by row, in place: no copy of the task vectors
        for t in tvs.values():
            for k in range(t.shape[0]):
                trim({"row": t[k : k + 1]}, d[k], scope, None, rule, at_least_one)
        return tvs
    return {n: torch.cat([trim({n: t[k : k + 1]}, d[k], scope, None, rule, at_least_one)[n] for k in range(t.shape[0])])
            for n, t in tvs.items()}


def trim_tasks_mergekit(tvs: dict[str, torch.Tensor], ctx: Context) -> dict[str, torch.Tensor]:
    """`trim_tasks` keeping at least one entry per tensor, as mergekit's magnitude trim does."""
    return trim_tasks(tvs, ctx, at_least_one=True)


def drop_density(tvs: dict[str, torch.Tensor], ctx: Context) -> dict[str, torch.Tensor]:
    """DARE with the method's own (per-model) `density` and mergekit's `rescale` (dare_linear, dare_ties),
    in place."""
    d = densities(tvs, ctx)
    rescale = ctx.params.get("rescale", "density")
    for n, t in tvs.items():
        for k in range(t.shape[0]):
            if d[k] < 1.0:
                rescaled_(t[k], lambda x: bernoulli_keep_(x, d[k], ctx.rng(k, n)), rescale, d[k])
    return tvs


def weighted(t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`t[k] * weights[k]` broadcast over the trailing dims."""
    return t * weights.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))


def weighted_sum(t: torch.Tensor, weights: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Σ_k weights[k] · t[k], computed as `weighted(t, weights).sum(0)` is (each column's products summed over
    k in order) but in column chunks into one output, with no `[K, ...]` temporary."""
    flat = t.reshape(t.shape[0], -1)
    w = weights.to(t.dtype).view(-1, 1)
    out = torch.empty(flat.shape[1], dtype=t.dtype, device=t.device)
    for start in range(0, flat.shape[1], chunk):
        torch.sum(flat[:, start : start + chunk] * w, dim=0, out=out[start : start + chunk])
    return out.view(t.shape[1:])


"""TaskRouter: route each query to its nearest tasks and mix those tasks' adapters (LoRAuter's scheme).

A task is represented by the L2-normalised mean of its validation examples' embeddings, so routing cost grows
with the number of tasks, not adapters, and adding a task costs only its embeddings. For a query q:
tasks = top-k by cosine(q, task), weights = softmax(cosine / temperature) over them, and each task passes its
weight to its adapters (shares summed when tasks share an adapter). A task without an adapter passes its
weight to the base model. When the best cosine is below `min_confidence`, the decision is the base model alone.

Task -> adapter mapping, first match wins: `task_adapters=` given to build, the Task's own adapters (task
folders), an adapter of the same name in the pool, the affinity matrix's best adapter(s), none.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.lora.adapters import AdapterPool
from engine.lora.affinity import AffinityMatrix
from engine.lora.encoder import Encoder, default_encoder
from engine.lora.errors import RoutingError
from engine.lora.tasks import Task, as_tasks, load_task_folder, normalise_adapters
from foundation.atomic import atomic_folder

FORMAT_VERSION = 1
_SAVED_FILES = ("router.json", "representations.safetensors")


@dataclass
class RoutingDecision:
    """One query's routing, JSON-serialisable for audit."""

    query: str
    tasks: list[str]
    weights: list[float]
    adapters: dict[str, float]
    confidence: float
    fallback: bool  # True: confidence below the threshold, the base model serves the query

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> RoutingDecision:
        return cls(**json.loads(text))


class TaskRouter:
    def __init__(self, encoder: Encoder, task_names: list[str], representations: torch.Tensor,
                 task_adapters: Mapping[str, Mapping[str, float]], *, pool: AdapterPool | None = None,
                 affinity: AffinityMatrix | None = None, k: int = 3, temperature: float = 0.2,
                 min_confidence: float = 0.2, max_examples: int = 32):
        if representations.shape != (len(task_names), encoder.dim):
            raise RoutingError(f"representations {tuple(representations.shape)} do not match "
                               f"{len(task_names)} tasks of dim {encoder.dim}")
        self.encoder, self.pool, self.affinity = encoder, pool, affinity
        self.task_names = list(task_names)
        self.representations = representations.float()
        self.task_adapters = {t: dict(task_adapters.get(t, {})) for t in self.task_names}
        self.k, self.temperature, self.min_confidence, self.max_examples = k, temperature, min_confidence, \
            max_examples
        self._check_params(k, temperature)

    @staticmethod
    def _check_params(k: int, temperature: float) -> None:
        if not isinstance(k, int) or k < 1:
            raise RoutingError(f"k must be a positive integer, got {k!r}")
        if not temperature > 0:
            raise RoutingError(f"temperature must be > 0, got {temperature!r}")

    # ---- building ------------------------------------------------------------------------------------
    @classmethod
    def build(cls, tasks, encoder: Encoder | None = None, adapters=None, *, task_adapters=None,
              affinity: AffinityMatrix | None = None, max_examples: int = 32, **defaults) -> TaskRouter:
        """tasks: dict task -> validation examples (list or JSONL path), or a task folder.
        adapters: an AdapterPool or dict adapter -> PEFT folder (optional)."""
        adapter_dirs = {}
        if isinstance(tasks, (str, Path)):
            tasks, adapter_dirs = load_task_folder(tasks)
        tasks = as_tasks(tasks)
        pool = adapters if isinstance(adapters, AdapterPool) or adapters is None else AdapterPool(adapters)
        if adapter_dirs:
            pool = pool if pool is not None else AdapterPool()
            for name, folder in adapter_dirs.items():
                if name not in pool:
                    pool.add(name, folder)
        encoder = encoder if encoder is not None else default_encoder()
        mapping = {}
        for name, task in tasks.items():
            explicit = (task_adapters or {}).get(name)
            if explicit is not None:
                mapping[name] = normalise_adapters(explicit, name)
            elif task.adapters:
                mapping[name] = dict(task.adapters)
            elif pool is not None and name in pool:
                mapping[name] = {name: 1.0}
            elif affinity is not None and name in affinity.tasks:
                mapping[name] = affinity.best(name)
            else:
                mapping[name] = {}
        reps = torch.stack([cls._represent(encoder, t, max_examples) for t in tasks.values()])
        router = cls(encoder, list(tasks), reps, mapping, pool=pool, affinity=affinity,
                     max_examples=max_examples, **defaults)
        if pool is not None:
            router.check_pool(pool)
        return router

    @staticmethod
    def _represent(encoder: Encoder, task: Task, max_examples: int) -> torch.Tensor:
        # validation sets may be cached on disk; queries (route) never are
        encode = getattr(encoder, "encode_persistent", encoder.encode)
        emb = encode(task.texts[:max_examples]).float()
        emb = torch.nn.functional.normalize(emb, dim=-1)
        return torch.nn.functional.normalize(emb.mean(0), dim=0)

    def add_task(self, name: str, examples, adapters=None) -> None:
        """Add (or replace) one task: embeds its examples, retrains nothing."""
        task = as_tasks({name: examples})[name]
        rep = self._represent(self.encoder, task, self.max_examples)
        share = normalise_adapters(adapters, name) or task.adapters
        if not share and self.pool is not None and name in self.pool:
            share = {name: 1.0}
        if self.pool is not None:
            self._check_names(share, self.pool)
        if name in self.task_names:
            self.representations[self.task_names.index(name)] = rep
        else:
            self.task_names.append(name)
            self.representations = torch.cat([self.representations, rep[None]])
        self.task_adapters[name] = share

    def check_pool(self, pool: AdapterPool) -> None:
        for task in self.task_names:
            self._check_names(self.task_adapters[task], pool, task)

    @staticmethod
    def _check_names(share: Mapping[str, float], pool: AdapterPool, task: str = "") -> None:
        for adapter in share:
            if adapter not in pool:
                raise RoutingError(f"task {task!r} maps to adapter {adapter!r}, which is not in the pool")

    # ---- routing -------------------------------------------------------------------------------------
    def route(self, queries: list[str], k: int | None = None, temperature: float | None = None,
              min_confidence: float | None = None) -> list[RoutingDecision]:
        if isinstance(queries, str):
            raise RoutingError("route() takes a list of queries, not one string")
        emb = self.encoder.encode(list(queries))
        return self.route_embeddings(emb, list(queries), k, temperature, min_confidence)

    def route_embeddings(self, emb: torch.Tensor, queries: list[str] | None = None, k: int | None = None,
                         temperature: float | None = None,
                         min_confidence: float | None = None) -> list[RoutingDecision]:
        """Routing after the encoder (what the latency benchmark times)."""
        k = self.k if k is None else k
        temperature = self.temperature if temperature is None else temperature
        min_confidence = self.min_confidence if min_confidence is None else min_confidence
        self._check_params(k, temperature)
        k = min(k, len(self.task_names))
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        sims, idx = torch.topk(emb @ self.representations.T, k, dim=1)
        weights = torch.softmax(sims / temperature, dim=1)
        queries = queries if queries is not None else [""] * emb.shape[0]
        decisions = []
        for q, (row_sims, row_idx, row_w) in enumerate(zip(sims.tolist(), idx.tolist(), weights.tolist())):
            fallback = row_sims[0] < min_confidence
            tasks = [self.task_names[i] for i in row_idx]
            adapters: dict[str, float] = {}
            if not fallback:
                for task, w in zip(tasks, row_w):
                    for adapter, share in self.task_adapters[task].items():
                        adapters[adapter] = adapters.get(adapter, 0.0) + w * share
            decisions.append(RoutingDecision(query=queries[q], tasks=tasks, weights=row_w, adapters=adapters,
                                             confidence=row_sims[0], fallback=fallback))
        return decisions

    # ---- persistence ---------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write router.json and representations.safetensors as one folder that appears (or replaces an earlier
        save) only when complete. A folder holding anything else is refused: saving never deletes other files."""
        folder = Path(folder)
        if folder.is_dir():
            other = sorted(p.name for p in folder.iterdir() if p.name not in _SAVED_FILES)
            if other:
                raise RoutingError(f"{folder} holds files that are not a router's ({', '.join(other[:5])}): "
                                   "save the router into its own folder")
        meta = {
            "format_version": FORMAT_VERSION,
            "encoder": self.encoder.name,
            "tasks": self.task_names,
            "task_adapters": self.task_adapters,
            "adapters": self.pool.paths() if self.pool is not None else None,
            "base_model": self.pool.base_model if self.pool is not None else None,
            "affinity": self.affinity.to_dict() if self.affinity is not None else None,
            "defaults": {"k": self.k, "temperature": self.temperature, "min_confidence": self.min_confidence,
                         "max_examples": self.max_examples},
        }
        with atomic_folder(folder, overwrite=True) as tmp:
            (tmp / "router.json").write_text(json.dumps(meta, indent=1))
            save_file({"representations": self.representations.contiguous()}, str(tmp / "representations.safetensors"))

    @classmethod
    def load(cls, folder: str | Path, encoder: Encoder | None = None) -> TaskRouter:
        folder = Path(folder)
        if not (folder / "router.json").is_file():
            raise RoutingError(f"{folder} has no router.json")
        meta = json.loads((folder / "router.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise RoutingError(f"{folder}: router format {meta.get('format_version')} is not {FORMAT_VERSION}")
        encoder = encoder if encoder is not None else default_encoder()
        if encoder.name != meta["encoder"]:
            raise RoutingError(f"the router was built with encoder {meta['encoder']!r}, not {encoder.name!r}")
        reps = load_file(str(folder / "representations.safetensors"))["representations"]
        pool = AdapterPool(meta["adapters"], base_model=meta["base_model"]) if meta["adapters"] is not None else None
        affinity = AffinityMatrix.from_dict(meta["affinity"]) if meta["affinity"] else None
        return cls(encoder, meta["tasks"], reps, meta["task_adapters"], pool=pool, affinity=affinity,
                   **meta["defaults"])

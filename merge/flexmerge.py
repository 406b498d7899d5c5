"""FlexMerge end to end: inputs → checks → one streaming scan → greedy plan → artifact of the chosen size.

A fixed size takes two streaming passes: the scan (checks and Gram matrices; nothing is written) and,
once the plan says which groups every block has at that size, a pass that computes each merged group
from its members' original task vectors and writes it. `size: all` takes one pass: while a block is in
memory its whole group tree is merged (every size's version of that block) and each member's
reconstruction error is recorded; the global order then interleaves the blocks into the size curve.
"""
from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from foundation.atomic import atomic_folder
from foundation.dtypes import parse_dtype
from foundation.io import Checkpoint
from merge import blocks as blocks_mod
from merge import greedy, methods, sizing, streamed
from merge import settings as settings_mod
from merge import vocab as vocab_mod
from merge.card import model_card
from merge.config import MergeSpec, check_out_apart
from merge.io import ShardWriter, copy_side_files
from merge.methods import Context, MergeResult
from merge.sparsify import threshold_from_histogram
from merge.stats import Stats, read_task_vectors, scan

FORMAT = "tessera-flexmerge"
MANIFEST = "manifest.json"
PLAN = "plan.json"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_compatible(base: Checkpoint, models: dict[str, Checkpoint]) -> list[str]:
    """Same architecture and tensor names as the base, or an error naming what differs. Returns the
    task-specific tensors: those whose shape differs between models or from the base, or that the base
    lacks (per-task classification heads). They are stored per task and never merged."""
    base_cfg = base.config() or {}
    specific = set()
    for task, ckpt in models.items():
        cfg = ckpt.config() or {}
        for key in ("architectures", "model_type"):
            if key in base_cfg and key in cfg and cfg[key] != base_cfg[key]:
                raise ValueError(f"{ckpt.folder}/config.json: {key} {cfg[key]} differs from the base's {base_cfg[key]}")
        missing = [n for n in base.names if n not in ckpt.shape]
        if missing:
            raise ValueError(f"model {task!r} ({ckpt.folder}) lacks tensor {missing[0]} of the base" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        specific.update(n for n in ckpt.names if n not in base.shape or ckpt.shape[n] != base.shape[n])
        for n in base.names:
            if ckpt.dtype[n] != base.dtype[n] and not (ckpt.dtype[n].is_floating_point and base.dtype[n].is_floating_point):
                raise ValueError(f"{ckpt.file_of[n]}: tensor {n} is {ckpt.dtype[n]}, the base's is {base.dtype[n]}")
    return sorted(specific)


@dataclass
class Setting:
    """The parameters of some tensors of a block: those for which every per-tensor setting agrees."""

    names: list[str]
    params: dict
    weights: torch.Tensor
    task_params: dict[str, list]


class Session:
    """Everything known from the config and the headers alone (no weights read)."""

    def __init__(self, spec: MergeSpec):
        check_out_apart(spec.out, [spec.base, *spec.models.values()] + ([spec.plan] if spec.plan else []))
        self.spec = spec
        self.method = methods.get(spec.method)
        user_params = dict(spec.params or {})
        weight = user_params.pop("weight", None)
        if "tie_break" in self.method.defaults and user_params.get("tie_break") is None:
            # mergekit's choice among tied magnitudes costs a sort at ~4x a tensor; the size curve holds the bound
            user_params["tie_break"] = "index" if sizing.parse_size(spec.size)[0] == "all" else "mergekit"
        self.param_settings = user_params
        self.params = methods.resolve_params(self.method, self._evaluate(user_params, "", 0.0))
        if spec.similarity not in greedy.SIMILARITIES:
            raise ValueError(f"similarity must be one of {greedy.SIMILARITIES}, got {spec.similarity!r}")
        if spec.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"--device {spec.device} requested but no CUDA device is available")
        self.base = Checkpoint(spec.base)
        self.tasks = list(spec.models)
        self.ckpts = {t: Checkpoint(p) for t, p in spec.models.items()}
        self.vocab = None
        if spec.tokenizer_source is not None:
            self.base, self.ckpts, self.vocab = vocab_mod.align(spec.tokenizer_source, self.base, self.ckpts)
        specific = check_compatible(self.base, self.ckpts)
        self.models = [self.ckpts[t] for t in self.tasks]
        w = {t: 1.0 for t in self.tasks}
        if isinstance(weight, dict) and "value" not in weight:
            unknown = sorted(set(map(str, weight)) - set(self.tasks))
            if unknown:
                raise ValueError(f"params.weight names unknown task(s) {unknown}; tasks are {self.tasks}")
            w.update({str(k): v for k, v in weight.items()})
        elif weight is not None:
            w = {t: weight for t in self.tasks}
        w.update(spec.weights)
        self.weight_settings = [w[t] for t in self.tasks]
        allowed = {**methods.COMMON_PARAMS, **self.method.defaults}
        self.model_params = {t: dict(spec.model_params.get(t) or {}) for t in self.tasks}
        for t, p in self.model_params.items():
            unknown = sorted(set(p) - set(allowed))
            if unknown:
                raise ValueError(f"model {t!r}: method {self.method.name!r} has no parameter(s) {unknown}; it takes {sorted(allowed)}")
        self.per_model_names = sorted({k for p in self.model_params.values() for k in p})
        self.per_tensor = any(settings_mod.varies(v) for v in [*user_params.values(), *self.weight_settings,
                                                              *(x for p in self.model_params.values() for x in p.values())])
        self.n_layers = settings_mod.count_layers(self.base.names)
        self.weights = torch.tensor([float(self._evaluate({"w": x}, "", 0.0).get("w", 1.0)) for x in self.weight_settings],
                                    dtype=torch.float32)
        self.specific = {t: [n for n in specific if n in c.shape] for t, c in zip(self.tasks, self.models)}
        self.blocks = blocks_mod.assign([n for n in self.base.names if n not in specific], spec.blocks)
        if spec.dtype is not None:
            parse_dtype(spec.dtype)
        self.costs = [
            sizing.block_cost(
                [(math.prod(self.base.shape[n]), self.out_dtype(n).itemsize) for n in b.tensors],
                self.method.masks,
                self.method.scales,
            )
            for b in self.blocks
        ]
        self.base_bytes = sum(c.param_bytes for c in self.costs)
        self.specific_bytes = int(sum(math.prod(c.shape[n]) * self.out_dtype(n, c).itemsize
                                      for c, names in zip(self.models, self.specific.values()) for n in names))
        self.global_scope = self.params.get("scope") == "global"
        if self.global_scope and "density" not in self.params:
            raise ValueError(f"scope: global trims by magnitude; {self.method.name} does not (use ties or magnitude_prune)")
        self._settings: dict[str, list[Setting]] = {}
        if spec.rng not in ("tessera", "mergekit"):
            raise ValueError(f"rng must be 'tessera' or 'mergekit', got {spec.rng!r}")
        if spec.rng == "mergekit" and (self.method.name not in methods.MERGEKIT_RANDOM or self.params.get("dare") is not None):
            raise ValueError(f"rng: mergekit reproduces mergekit's drops of {', '.join(methods.MERGEKIT_RANDOM)}; "
                             f"{self.method.name}" + (" with tessera's `dare:`" if self.params.get("dare") is not None else "")
                             + " has no mergekit counterpart")
        self._mergekit_states: dict | None = None

    @staticmethod
    def _evaluate(values: dict, name: str, t: float) -> dict:
        out = {k: settings_mod.evaluate(v, name, t) for k, v in values.items()}
        return {k: v for k, v in out.items() if v is not None}

    def settings(self, block: blocks_mod.Block) -> list[Setting]:
        """The block's tensors grouped by their evaluated parameters (one group unless settings vary)."""
        if block.name in self._settings:
            return self._settings[block.name]
        groups: dict[str, Setting] = {}
        for n in block.tensors:
            t = settings_mod.layer_fraction(n, self.n_layers)
            params = methods.resolve_params(self.method, self._evaluate(self.param_settings, n, t))
            weights = [float(self._evaluate({"w": x}, n, t).get("w", 1.0)) for x in self.weight_settings]
            task_params = {k: [self._evaluate({k: self.model_params[task].get(k)}, n, t).get(k) for task in self.tasks]
                           for k in self.per_model_names}
            key = json.dumps([params, weights, task_params], sort_keys=True, default=str)
            if key not in groups:
                groups[key] = Setting([], params, torch.tensor(weights, dtype=torch.float32), task_params)
            groups[key].names.append(n)
        self._settings[block.name] = list(groups.values())
        return self._settings[block.name]

    def mergekit_states(self) -> dict:
        """Where mergekit's generator stands at each (tensor, task)'s drops (`methods.mergekit_states`),
        computed once from the headers and the per-tensor settings."""
        if self._mergekit_states is None:
            draws = []
            setting_of = {n: s for b in self.blocks for s in self.settings(b) for n in s.names}
            for n in sorted(setting_of):
                if not self.base.dtype[n].is_floating_point:
                    continue  # mergekit copies non-float buffers
                s = setting_of[n]
                for k, task in enumerate(self.tasks):
                    own = s.task_params.get("density", [None] * self.M)[k]
                    d = float(s.params["density"] if own is None else own)
                    if d < 1.0 and (d > 0.0 or self.method.name.startswith("dare")):
                        draws.append((n, task, math.prod(self.base.shape[n])))
            self._mergekit_states = methods.mergekit_states(int(self.params["seed"]), draws)
        return self._mergekit_states

    @property
    def M(self) -> int:
        return len(self.tasks)

    def out_dtype(self, name: str, ckpt: Checkpoint | None = None) -> torch.dtype:
        dtype = (ckpt or self.base).dtype[name]
        if self.spec.dtype is not None and dtype.is_floating_point:
            return parse_dtype(self.spec.dtype)
        return dtype

    def scan(self, on_block=None) -> Stats:
        stats = scan(self.base, self.models, self.blocks, device=self.spec.device,
                     signs=self.spec.similarity == "sign", histograms=self.global_scope, on_block=on_block)
        self.check_values(stats)
        return stats

    def check_values(self, stats: Stats) -> None:
        if self.spec.base_hash and stats.base_hash != self.spec.base_hash:
            raise ValueError(f"base {self.base.folder} has hash {stats.base_hash}, expected {self.spec.base_hash}")
        base_norm = math.sqrt(max(stats.base_sq_norm, 1e-30))
        for k, sq in enumerate(stats.task_matrix_sq_norms):
            rel = math.sqrt(max(sq, 0.0)) / base_norm
            if rel > self.spec.max_relative_distance:
                raise ValueError(
                    f"model {self.tasks[k]!r} ({self.models[k].folder}) differs from the base by {rel:.2f}× the base's "
                    "weight-matrix norm: "
                    f"it does not look fine-tuned from {self.base.folder} (raise max_relative_distance if intended)"
                )

    def similarities(self, stats: Stats) -> list[np.ndarray]:
        return [greedy.similarity(g, self.spec.similarity, s, n) for g, s, n in zip(stats.grams, stats.signs, stats.numels)]

    def thresholds(self, stats: Stats) -> torch.Tensor | None:
        if not self.global_scope:
            return None
        return threshold_from_histogram(stats.histogram, float(self.params["density"]))

    def context(self, block: blocks_mod.Block, members: tuple[int, ...], thresholds=None, setting: Setting | None = None,
                base_t: dict | None = None) -> Context:
        setting = setting or self.settings(block)[0]
        idx = list(members)
        names = [self.tasks[i] for i in idx]
        dev = self.spec.device
        return Context(
            params=setting.params,
            weights=setting.weights[idx].to(dev),
            thresholds=None if thresholds is None else thresholds[idx].to(dev),
            rng=(methods.mergekit_rng(self.mergekit_states(), names) if self.spec.rng == "mergekit"
                 else methods.seeded_rng(int(setting.params["seed"]), block.name, names)),
            task_params={k: [v[i] for i in idx] for k, v in setting.task_params.items()} or None,
            base=None if base_t is None else {n: base_t[n].to(device=dev, dtype=torch.float32) for n in setting.names},
        )

    def prepare_block(self, block: blocks_mod.Block, tvs: dict, thresholds, base_t: dict | None = None,
                      in_place: bool = False) -> dict:
        """The method's per-task step (trimming, drops) for every task of the block, done once.

        `in_place` (the write pass, which needs the raw task vectors no more) prepares one task at a time and
        writes its row back into `tvs`, so the block is held once instead of twice. Row k depends only on
        task k (see `methods.prepare`), so this equals preparing all tasks together; a method whose prepared
        tensors are not the task vectors' names, shapes and dtype is prepared the usual way."""
        out = {}
        for s in self.settings(block):
            floats = {n: tvs[n] for n in s.names if self.base.dtype[n].is_floating_point}
            if not floats:
                continue
            if in_place and self._prepare_rows_in_place(block, floats, thresholds, s, base_t):
                out.update(floats)
                continue
            out.update(methods.prepare(self.method, floats, self.context(block, tuple(range(self.M)), thresholds, s, base_t)))
        return out

    def _prepare_rows_in_place(self, block, floats: dict, thresholds, setting: Setting, base_t) -> bool:
        for k in range(self.M):
            rows = methods.prepare(self.method, {n: t[k : k + 1] for n, t in floats.items()},
                                   self.context(block, (k,), thresholds, setting, base_t), in_place=True)
            if k == 0 and not (rows.keys() == floats.keys() and all(
                    rows[n].shape == t[:1].shape and rows[n].dtype == t.dtype for n, t in floats.items())):
                return False  # nothing written yet
            for n, t in floats.items():
                if rows[n].data_ptr() != t[k].data_ptr():
                    t[k : k + 1].copy_(rows[n])
            del rows
        return True

    def merge_group(self, block: blocks_mod.Block, members: tuple[int, ...], prepared: dict, base_t: dict | None = None) -> MergeResult:
        """One group of one block, recomputed from its members' (prepared) original task vectors."""
        index = torch.tensor(list(members), device=self.spec.device)
        every_task = list(members) == list(range(self.M))  # the rows as they are: no copy
        vector, masks, scales = {}, {}, {}
        for s in self.settings(block):
            names = set(s.names)
            rows = {k: t if every_task else t.index_select(0, index)
                    for k, t in prepared.items() if k.split("::", 1)[0] in names}
            if not rows:
                continue
            res = self.method.fn(rows, self.context(block, members, None, s, base_t))
            vector.update(res.vector)
            masks.update(res.masks or {})
            scales.update(res.scales or {})
        return MergeResult(vector, masks or None, scales or None)

    def rows_apart(self, block: blocks_mod.Block) -> bool:
        """The block can be merged a tensor and a few rows at a time (see `streamed`)."""
        return all(self.method.rows_apart(s.params) for s in self.settings(block))

    @property
    def linear(self) -> bool:
        """Merged groups are fixed combinations Σ c_k τ_k (no DARE, no data-dependent masks), the same in
        every tensor."""
        if self.method.coefficients is None or self.params.get("dare") is not None or self.per_tensor:
            return False
        return self.method.coefficients(Context(self.params, self.weights)) is not None

    def steps_for(self, stats: Stats) -> list[greedy.Step]:
        steps = greedy.plan(self.similarities(stats)) if self.spec.plan is None else load_plan(self.spec.plan, self)
        return sizing.byte_ordered(steps, self.costs, self.M, self.method.modulated)


def load_plan(path: str, session: Session) -> list[greedy.Step]:
    """Replay a saved plan; it must be for the same tasks and blocks."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"merge plan not found: {p}")
    data = json.loads(p.read_text())
    if data.get("tasks") != session.tasks:
        raise ValueError(f"{p}: plan is for tasks {data.get('tasks')}, this merge has {session.tasks}")
    if data.get("blocks") != [b.name for b in session.blocks]:
        raise ValueError(f"{p}: plan's blocks differ from this merge's blocks (different model or `blocks` rules)")
    return [greedy.Step(s["block"], tuple(s["a"]), tuple(s["b"]), float(s["score"])) for s in data["steps"]]


def plan_json(session: Session, steps: list[greedy.Step], sizes: list[int], errors: list[list[float]] | None = None) -> dict:
    curve, smallest = [], math.inf
    for state, nbytes in enumerate(sizes):
        # inside a multi-step merge of one block (methods with modulators): never chosen
        point = {"state": state, "bytes": nbytes, "size": nbytes / session.base_bytes, "taken": nbytes < smallest}
        smallest = min(smallest, nbytes)
        if errors is not None:
            point["relative_error"] = dict(zip(session.tasks, errors[state]))
            point["mean_relative_error"] = float(np.mean(errors[state]))
        curve.append(point)
    return {
        "format": FORMAT + "-plan",
        "tasks": session.tasks,
        "blocks": [b.name for b in session.blocks],
        "method": session.method.name,
        "params": session.params,
        "similarity": session.spec.similarity,
        "base_bytes": session.base_bytes,
        "steps": [{"block": s.block, "a": list(s.a), "b": list(s.b), "score": s.score} for s in steps],
        "curve": curve,
    }


def dry_run(spec: MergeSpec) -> dict:
    """Blocks, reachable sizes, expected memory and time — from headers only."""
    s = Session(spec)
    M = s.M
    largest = max(sum(math.prod(s.base.shape[n]) for n in b.tensors) for b in s.blocks)
    read_bytes = sum(s.base.nbytes(n) for n in s.base.names) * (M + 1)
    flops = 2 * M * M * sum(math.prod(s.base.shape[n]) for n in s.base.names)
    kind, _ = sizing.parse_size(spec.size)
    passes = 1 if kind == "all" else 2
    return {
        "tasks": s.tasks,
        "method": s.method.name,
        "params": s.params,
        "blocks": [{"name": b.name, "tensors": len(b.tensors), "bytes": c.param_bytes} for b, c in zip(s.blocks, s.costs)],
        "base_bytes": s.base_bytes,
        "sizes": {
            "max": M * 1.0,
            "min_parameter_only": 1.0,
            "smallest_step": min(c.param_bytes for c in s.costs) / s.base_bytes,
            "steps": len(s.blocks) * (M - 1),
        },
        # The largest block's float32 task vectors (M), its base and the merged result, plus ~300 MB for
        # Python and torch.
        "expected_peak_memory_bytes": int((M + 2) * largest * 4 + 300e6),
        # Rough: disk/page-cache reads at ~1 GB/s and Gram matrices at ~20 GFLOP/s per pass.
        "expected_seconds": round(passes * (read_bytes / 1e9 + flops / 2e10), 1),
        "passes": passes,
    }


def run(spec: MergeSpec) -> dict:
    kind, value = sizing.parse_size(spec.size)
    session = Session(spec)
    if kind == "all":
        return run_curve(session)
    if spec.out is None:
        raise ValueError("the merge needs `out` (the artifact folder)")
    t0 = time.perf_counter()
    stats = session.scan()
    steps = session.steps_for(stats)
    sizes = sizing.curve(session.costs, steps, session.M, session.method.modulated)
    if kind == "min":
        state = len(sizes) - 1
    elif kind == "multiplier":
        if value < 1.0:
            raise ValueError(f"size must be at least 1 (one merged model), got {value}")
        state = sizing.choose_state(sizes, value * session.base_bytes)
    else:
        state = sizing.choose_state(sizes, value - session.specific_bytes)
    parts = greedy.partitions_at(steps, len(session.blocks), session.M, state)
    manifest = write_artifact(session, stats, parts, sizes[state], Path(spec.out), plan_json(session, steps, sizes), state)
    return {
        "out": spec.out,
        "tasks": session.tasks,
        "method": session.method.name,
        "size": manifest["size"],
        "groups_per_block": [len(p) for p in parts],
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """Bool `[K, ...]` → uint8 `[K, ceil(numel / 8)]`, eight entries per byte."""
    flat = mask.reshape(mask.shape[0], -1).to(torch.uint8).cpu()
    pad = (-flat.shape[1]) % 8
    flat = torch.nn.functional.pad(flat, (0, pad))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat.view(flat.shape[0], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def write_artifact(session: Session, stats: Stats, parts, nbytes: int, out: Path, plan: dict, state: int) -> dict:
    """Second pass: compute the groups that this size keeps and write them, atomically."""
    spec, method = session.spec, session.method
    thresholds = session.thresholds(stats)
    block_entries = []
    max_shard = int(sizing.parse_bytes(spec.max_shard_size))
    with atomic_folder(out, spec.overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard, total_bytes=nbytes, desc="merge")
        for block, groups in zip(session.blocks, parts):
            merged = any(len(g) > 1 or method.singletons for g in groups)
            if merged and session.rows_apart(block):
                block_entries.append(_write_block_by_rows(session, block, groups, thresholds, writer, tmp))
                continue
            base_t, tvs, prepared = None, None, None
            if merged:
                tvs = read_task_vectors(session.base, session.models, block, spec.device)[1]
                # no preparation uses the base: reading it again afterwards leaves its room to the trims' sorts
                prepared = session.prepare_block(block, tvs, thresholds, None, in_place=True)
                base_t = session.base.read(block.tensors)
            plain = len(groups) == 1 and not (merged and method.modulated)
            entries = []
            for j, g in enumerate(groups):
                suffix = "" if plain else f"::g{j}"
                entry = {"tasks": [session.tasks[i] for i in g], "suffix": suffix}
                if len(g) == 1 and not method.singletons:
                    entry["kind"] = "full"
                    _write_full(session, block, g[0], suffix, writer)
                else:
                    res = session.merge_group(block, g, prepared, base_t)
                    entry["kind"] = "modulated" if method.modulated else "merged"
                    for n in block.tensors:
                        dtype = session.out_dtype(n)
                        if n not in res.vector:  # non-float buffers are not merged: all members share the base's
                            writer.add(n + suffix, base_t[n])
                            continue
                        if method.modulated:
                            writer.add(f"{n}{suffix}::vector", res.vector[n].to(dtype))
                            if res.masks is not None:
                                writer.add(f"{n}{suffix}::mask", _pack(res.masks[n]))
                            if res.scales is not None:
                                writer.add(f"{n}{suffix}::scale", res.scales[n].float())
                        else:
                            writer.add(n + suffix, _plus_base(res.vector[n], base_t[n], prepared).to(dtype))
                    # written: drop it now, or it would sit beside the next group's (or block's) buffers
                    del res
                entries.append(entry)
            if merged and method.modulated:
                for n, t in base_t.items():
                    writer.add(f"{n}::base", t.to(session.out_dtype(n)))
            block_entries.append({"name": block.name, "tensors": block.tensors, "groups": entries})
            del base_t, tvs, prepared
        if any(session.specific.values()):
            block_entries.append(write_task_specific(session, writer))
        files = writer.close()
        copy_side_files(session.base.folder, tmp)
        if session.vocab is not None:
            vocab_mod.write_tokenizer(spec.tokenizer_source, session.base.folder, spec.models, session.vocab, tmp)
        manifest = {
            "format": FORMAT,
            "version": 1,
            "tasks": session.tasks,
            "method": method.name,
            "params": session.params,
            "similarity": spec.similarity,
            "blocks_rules": spec.blocks,
            "size": {"bytes": nbytes + session.specific_bytes, "multiplier": nbytes / session.base_bytes,
                     "base_bytes": session.base_bytes, "task_specific_bytes": session.specific_bytes,
                     "state": state, "states": len(plan["steps"]) + 1},
            "tensors": {n: {"shape": list(session.base.shape[n]), "dtype": str(session.out_dtype(n)).removeprefix("torch.")}
                        for b in session.blocks for n in b.tensors},
            "blocks": block_entries,
            "hashes": {"base": stats.base_hash, "files": {f: _file_hash(tmp / f) for f in files}},
            "spec": {k: v for k, v in asdict(spec).items() if k not in ("overwrite",)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (tmp / PLAN).write_text(json.dumps(plan, indent=1))
        (tmp / "README.md").write_text(model_card(manifest, spec))  # the base's card describes another model
    return manifest


def _write_full(session: Session, block, task: int, suffix: str, writer: ShardWriter) -> None:
    """A group of one model kept as it is: its tensors copied one at a time."""
    for n in block.tensors:
        writer.add(n + suffix, session.models[task].read([n])[n].to(session.out_dtype(n)))


def _write_block_by_rows(session: Session, block, groups, thresholds, writer: ShardWriter, tmp: Path) -> dict:
    """A block whose method runs by rows (`streamed`): the groups' tensors made and written row range by
    row range, the tasks' preparation spilled to a scratch file first."""
    method, entries = session.method, []
    merged = sorted({k for g in groups if len(g) > 1 or method.singletons for k in g})
    needs = method.prepare is not None or any(s.params.get("dare") is not None for s in session.settings(block))
    prepared = streamed.Prepared(session, block, merged, thresholds, tmp / ".prepared.spill") if needs else None
    try:
        for j, g in enumerate(groups):
            suffix = "" if len(groups) == 1 else f"::g{j}"
            entry = {"tasks": [session.tasks[i] for i in g], "suffix": suffix}
            if len(g) == 1 and not method.singletons:
                entry["kind"] = "full"
                _write_full(session, block, g[0], suffix, writer)
            else:
                entry["kind"] = "merged"
                streamed.write_group(session, block, g, suffix, writer, prepared)
            entries.append(entry)
    finally:
        if prepared is not None:
            prepared.close()
    return {"name": block.name, "tensors": block.tensors, "groups": entries}


def _plus_base(vector: torch.Tensor, base: torch.Tensor, prepared: dict) -> torch.Tensor:
    """θ_0 + v, into v's own buffer when nothing else uses it (no extra tensor-sized copy)."""
    others = {t.untyped_storage().data_ptr() for t in prepared.values()} | {base.untyped_storage().data_ptr()}
    if vector.untyped_storage().data_ptr() in others:
        return base.to(vector) + vector
    return vector.add_(base.to(vector))  # = base + vector (addition commutes exactly)


def write_task_specific(session: Session, writer: ShardWriter) -> dict:
    """Tensors that differ in shape per task or that the base lacks: each task's own, stored as they are."""
    groups, names = [], sorted({n for v in session.specific.values() for n in v})
    for j, (task, ckpt) in enumerate(zip(session.tasks, session.models)):
        own = session.specific[task]
        for n, t in ckpt.read(own).items():
            writer.add(f"{n}::g{j}", t.to(session.out_dtype(n, ckpt)))
        groups.append({"tasks": [task], "suffix": f"::g{j}", "kind": "full", "tensors": own})
    return {"name": "task_specific", "tensors": names, "groups": groups}


def _file_hash(path: Path) -> str:
    h, buffer = hashlib.blake2b(digest_size=16), memoryview(bytearray(1 << 18))
    with open(path, "rb") as f:  # read into one small buffer (hashlib.file_digest needs Python 3.11)
        while got := f.readinto(buffer):
            h.update(buffer[:got])
    return h.hexdigest()


def run_curve(session: Session) -> dict:
    """`size: all` in one streaming pass: every block's group tree merged while the block is in memory."""
    t0 = time.perf_counter()
    M = session.M
    local_steps: list[list[tuple]] = []
    node_errors: list[dict[tuple, list[float]]] = []
    # Global thresholds need the whole model's histograms before any block is merged: an extra pass.
    thresholds = session.thresholds(session.scan()) if session.global_scope else None

    planned = load_plan(session.spec.plan, session) if session.spec.plan else None

    def on_block(b, block, base_t, tvs, stats):
        if planned is not None:
            steps = [s for s in planned if s.block == b]
        else:
            sim = greedy.similarity(stats.grams[b], session.spec.similarity, stats.signs[b], stats.numels[b])
            steps = greedy.plan([sim])
        errors = _merge_tree_linear(session, block, steps, tvs, stats.grams[b]) if session.linear else None
        if errors is None:
            errors = {}
            prepared = session.prepare_block(block, tvs, thresholds, base_t)
            for step in steps:
                members = step.merged
                res = session.merge_group(block, members, prepared, base_t)
                errors[members] = [
                    sum(float((res.task_vector(pos, n) - tvs[n][k]).pow(2).sum()) for n in res.vector)
                    for pos, k in enumerate(members)
                ]
        local_steps.append([(s.a, s.b) for s in steps])
        node_errors.append(errors)

    stats = session.scan(on_block=on_block)
    steps = planned if planned is not None else greedy.plan(session.similarities(stats))
    steps = sizing.byte_ordered(steps, session.costs, M, session.method.modulated)
    for b in range(len(session.blocks)):
        taken = [(s.a, s.b) for s in steps if s.block == b]
        if taken != local_steps[b][: len(taken)]:
            raise RuntimeError(f"block {session.blocks[b].name}: global and per-block merge orders disagree")
    sizes = sizing.curve(session.costs, steps, M, session.method.modulated)
    errors = _error_curve(session, stats, steps, node_errors)
    plan = plan_json(session, steps, sizes, errors)
    if session.spec.out is not None:
        with atomic_folder(session.spec.out, session.spec.overwrite) as tmp:
            (tmp / PLAN).write_text(json.dumps(plan, indent=1))
    return {
        "out": session.spec.out,
        "tasks": session.tasks,
        "method": session.method.name,
        "states": len(sizes),
        "curve": [(round(p["size"], 3), round(p["mean_relative_error"], 4)) for p in plan["curve"]],
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _merge_tree_linear(session: Session, block, steps: list[greedy.Step], tvs: dict, gram: np.ndarray,
                       chunk: int = 1 << 17, collect: dict | None = None) -> dict[tuple, list[float]] | None:
    """All merged groups of a block for a linear method, v_G = Σ_k c_{G,k} τ_k, with each member's error
    ||v_G − τ_k||² taken from the Gram matrix: cᵀGc − 2(Gc)_k + G_kk.

    When every group's coefficients are a per-group multiple r_G of the task weights (task arithmetic,
    averaging), a group's weighted sum is its two children's sums added: each group costs one add and
    one scale per entry instead of a product over all M tasks. Column chunks keep the working set in
    cache. The merged blocks are computed — this is the work of every size — and dropped, unless
    `collect` asks for them. Returns None when the coefficients are not of that form."""
    M = session.M
    groups = [s.merged for s in steps]
    C = torch.zeros((len(groups), M), dtype=torch.float64)
    for i, g in enumerate(groups):
        C[i, list(g)] = session.method.coefficients(session.context(block, g)).double().cpu()
    w = session.weights.double()
    ratios = [C[i, list(g)] / w[list(g)] for i, g in enumerate(groups)]
    if not all(torch.allclose(r, r[0].expand_as(r)) for r in ratios):
        return None
    scale = [float(r[0]) for r in ratios]
    position = {g: i for i, g in enumerate(groups)}
    children = [(position.get(s.a, s.a), position.get(s.b, s.b)) for s in steps]
    dev = session.spec.device
    unit = bool(torch.all(w == 1))
    weights = session.weights.to(dev)
    sums = torch.empty((len(groups), chunk), device=dev)
    merged = torch.empty(chunk, device=dev)
    for n, t in tvs.items():
        if not session.base.dtype[n].is_floating_point:
            continue
        flat = t.reshape(M, -1)
        for start in range(0, flat.shape[1], chunk):
            part = flat[:, start : start + chunk]
            width = part.shape[1]

            def operand(ref):
                if isinstance(ref, int):  # an earlier group of this block
                    return sums[ref, :width]
                return part[ref[0]] if unit else part[ref[0]] * weights[ref[0]]

            for i, (a, b) in enumerate(children):
                torch.add(operand(a), operand(b), out=sums[i, :width])
                block_i = sums[i, :width]  # with r_G = 1 the sum is the merged block itself
                if scale[i] != 1.0:
                    block_i = torch.mul(block_i, scale[i], out=merged[:width])
                if collect is not None:
                    collect.setdefault((groups[i], n), []).append(block_i.clone())
    G = torch.from_numpy(gram)
    GC = C @ G
    quad = (GC * C).sum(1)
    return {g: [float(quad[i] - 2 * GC[i, k] + G[k, k]) for k in g] for i, g in enumerate(groups)}


def _error_curve(session: Session, stats: Stats, steps, node_errors) -> list[list[float]]:
    """Per state, each task's relative reconstruction error ||τ̂_k − τ_k|| / ||τ_k|| over the whole model."""
    M = session.M
    norms = stats.task_sq_norms()
    current = np.zeros((len(session.blocks), M))
    total = np.zeros(M)

    def rel():
        return [float(math.sqrt(total[k] / norms[k])) if norms[k] > 0 else 0.0 for k in range(M)]

    out = [rel()]
    for step in steps:
        members = step.merged
        for pos, k in enumerate(members):
            new = node_errors[step.block][members][pos]
            total[k] += new - current[step.block, k]
            current[step.block, k] = new
        out.append(rel())
    return out

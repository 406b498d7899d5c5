"""A FlexMerge artifact as a registry entry: build one task's model, or export it as a plain checkpoint.

The folder holds the unique stored tensors (safetensors) and `manifest.json`, which says for every block
which group each task belongs to and how that group is stored: `full` (a fine-tuned block as is),
`merged` (θ_0 + merged vector) or `modulated` (base + unified vector + per-task bit masks / scales).
All tasks' models built from one artifact in one process read the stored tensors once and share them:
a task's parameter IS the stored tensor wherever its group is not modulated.
"""
from __future__ import annotations

import json
import weakref
from pathlib import Path

import torch

from foundation.atomic import atomic_folder
from foundation.dtypes import parse_dtype
from foundation.io import Checkpoint
from merge.config import check_out_apart
from merge.flexmerge import FORMAT, MANIFEST, PLAN, _file_hash
from merge.io import ShardWriter, copy_side_files

_STORES: "weakref.WeakValueDictionary[tuple, _Store]" = weakref.WeakValueDictionary()


class _Store:
    """The stored tensors of one artifact in one dtype on one device, read on first use and kept, so a task
    reads only its own blocks and tasks loaded later reuse the shared ones. `keep=False` keeps nothing
    (export streams block by block)."""

    def __init__(self, path: Path, dtype, device, keep: bool = True):
        self.ckpt = Checkpoint(path)
        self.dtype, self.device, self.keep = dtype, device, keep
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, keys: list[str]) -> dict[str, torch.Tensor]:
        missing = [k for k in keys if k not in self.tensors]
        fresh = {}
        for k, t in self.ckpt.read(missing).items():
            if self.dtype is not None and t.is_floating_point() and not k.endswith("::scale"):
                t = t.to(self.dtype)
            fresh[k] = t.to(self.device) if self.device is not None else t
        if self.keep:
            self.tensors.update(fresh)
        return {k: fresh[k] if k in fresh else self.tensors[k] for k in keys}


def is_artifact(path) -> bool:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def read_manifest(path) -> dict:
    if not is_artifact(path):
        raise FileNotFoundError(f"{path} is not a FlexMerge artifact (no {MANIFEST} of format {FORMAT})")
    return json.loads((Path(path) / MANIFEST).read_text())


def verify(path) -> None:
    """Check the weight files against the hashes recorded when the artifact was written."""
    for name, digest in read_manifest(path)["hashes"]["files"].items():
        f = Path(path) / name
        if not f.is_file():
            raise FileNotFoundError(f"{f}: weight file of the artifact is missing")
        if _file_hash(f) != digest:
            raise ValueError(f"{f}: contents do not match the hash in {MANIFEST} (corrupted or modified)")


def _unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def _store(path: Path, dtype, device) -> _Store:
    manifest = path / MANIFEST
    key = (str(path.resolve()), manifest.stat().st_mtime_ns, str(dtype), str(device))
    store = _STORES.get(key)
    if store is None:
        store = _Store(path, dtype, device)
        _STORES[key] = store
    return store


def task_blocks(path: Path, task: str, store: _Store):
    """Task `task`'s tensors one block at a time (original names): `{name: tensor}` per block."""
    manifest = read_manifest(path)
    if task not in manifest["tasks"]:
        raise KeyError(f"task {task!r} is not in artifact {path}; its tasks are {manifest['tasks']}")
    names = set(store.ckpt.names)
    for block in manifest["blocks"]:
        group = next((g for g in block["groups"] if task in g["tasks"]), None)
        if group is None:
            continue
        pos, sfx = group["tasks"].index(task), group["suffix"]
        tensors = group.get("tensors", block["tensors"])
        plain = [n for n in tensors if group["kind"] != "modulated" or n + sfx in names]
        keys = [n + sfx for n in plain]
        for n in tensors:
            if n not in plain:
                keys += [k for k in (f"{n}::base", f"{n}{sfx}::vector", f"{n}{sfx}::mask", f"{n}{sfx}::scale") if k in names]
        t = store.get(keys)
        state = {n: t[n + sfx] for n in plain}
        for n in tensors:
            if n in plain:
                continue
            base, vec = t[f"{n}::base"], t[f"{n}{sfx}::vector"]
            delta = vec.float()
            if f"{n}{sfx}::mask" in t:
                delta = delta * _unpack(t[f"{n}{sfx}::mask"][pos], vec.numel()).view(vec.shape)
            if f"{n}{sfx}::scale" in t:
                delta = delta * t[f"{n}{sfx}::scale"][pos].float()
            state[n] = (base.float() + delta).to(base.dtype)
        yield state


def task_state_dict(path, task: str, *, dtype=None, device=None) -> tuple[dict[str, torch.Tensor], "_Store"]:
    """Task `task`'s full state dict (original tensor names) and the store its tensors live in. Only the
    task's own stored tensors are read."""
    path = Path(path)
    read_manifest(path)  # a clear error for a folder that is not an artifact
    store = _store(path, None if dtype is None else parse_dtype(dtype), device)
    state = {}
    for block in task_blocks(path, task, store):
        state.update(block)
    return state, store


def load_task_model(path, task: str, *, dtype=None, device=None) -> torch.nn.Module:
    """A transformers model for `task`, sharing its unmodulated tensors with the artifact's other tasks.

    The state dict goes through `from_pretrained(None, config=..., state_dict=...)`, so checkpoint-format
    renames (e.g. ViT's legacy names in transformers 5) are applied the way transformers loads any
    checkpoint, and the tensors are used as they are: no copies."""
    import transformers

    state, store = task_state_dict(path, task, dtype=dtype, device=device)
    dtype = None if dtype is None else parse_dtype(dtype)
    config = transformers.AutoConfig.from_pretrained(str(path))
    archs = getattr(config, "architectures", None) or []
    if not archs or not hasattr(transformers, archs[0]):
        raise RuntimeError(f"{path}/config.json names no transformers architecture ({archs}); cannot build a model")
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    model = getattr(transformers, archs[0]).from_pretrained(
        None, config=config, state_dict=state, dtype=dtype or (floating[0] if floating else None)
    )
    if device is not None:
        model.to(device)
    model._tessera_store = store  # keeps the shared tensors alive (and shared) while any task model lives
    return model.eval()


def export(path, task: str, out, *, overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `task`'s model as a standard Hugging Face checkpoint folder (config and tokenizer included)."""
    path = Path(path)
    check_out_apart(out, [path])
    verify(path)
    manifest = read_manifest(path)
    if task not in manifest["tasks"]:
        raise KeyError(f"task {task!r} is not in artifact {path}; its tasks are {manifest['tasks']}")
    with atomic_folder(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, desc=f"export {task}")
        for block in task_blocks(path, task, _Store(path, None, None, keep=False)):
            for n, t in block.items():
                writer.add(n, t)
        writer.close()
        copy_side_files(path, tmp)
        for name in (MANIFEST, PLAN):
            (tmp / name).unlink(missing_ok=True)
    return Path(out)

"""The single streaming pass over all checkpoints.

For one block at a time it reads the base and every model, forms the task vectors τ_k = θ_k − θ_0 in one
`[M, numel]` float32 buffer per tensor (each model's copy is dropped right after subtracting), and
accumulates what planning needs: the Gram matrix of the block (cosine and Euclidean similarities both
follow from it), optionally the sign-agreement matrix and magnitude histograms for `scope: global`, the
squared norms used by the base-distance check and a hash of the base. All of these add up over parts of a
tensor, so the pass reads each tensor a few rows at a time (`spans`) and holds no block. A caller that looks
at each block's task vectors (`on_block`, with the statistics gathered so far, this block's Gram matrix
included) gets whole blocks instead: M + 1 blocks in float32, its task vectors and its base (nothing is read
ahead).

Finiteness is checked through the Gram diagonal: Σ τ² is non-finite whenever any entry is, so the full
element-wise check only runs to name the culprit.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from merge.blocks import Block
from foundation.io import Checkpoint
from merge.io import tensor_bytes
from merge.sparsify import magnitude_histogram


@dataclass
class Stats:
    grams: list[np.ndarray] = field(default_factory=list)
    signs: list[np.ndarray | None] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    # Squared norms over weight matrices only (dim >= 2): the base-distance check ignores norms and biases,
    # whose constant initialisation makes unrelated models look close.
    base_sq_norm: float = 0.0
    task_matrix_sq_norms: np.ndarray | None = None
    histogram: torch.Tensor | None = None
    base_hash: str = ""

    def task_sq_norms(self) -> np.ndarray:
        return np.sum([np.diag(g) for g in self.grams], axis=0)


class Arena:
    """One float32 buffer reused for every block's task vectors, so the pass allocates (and page-faults)
    its largest block once instead of once per block. Views into it are valid until the next block."""

    def __init__(self, device: str):
        self.device = device
        self.buffer = torch.empty(0, dtype=torch.float32, device=device)

    def views(self, rows: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        total = rows * sum(int(np.prod(s)) for s in shapes.values())
        if self.buffer.numel() < total:
            self.buffer = torch.empty(0, dtype=torch.float32, device=self.device)  # free before growing
            self.buffer = torch.empty(total, dtype=torch.float32, device=self.device)
        out, start = {}, 0
        for n, s in shapes.items():
            size = rows * int(np.prod(s))
            out[n] = self.buffer[start : start + size].view(rows, *s)
            start += size
        return out


def _check_base(base: Checkpoint, name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t.float().sum()) and not torch.isfinite(t).all():
        raise ValueError(f"{base.file_of[name]}: tensor {name} of the base has non-finite values")


def read_task_vectors(base: Checkpoint, models: list[Checkpoint], block: Block, device: str,
                      arena: Arena | None = None) -> tuple[dict, dict]:
    """`(base tensors, {name: τ [M, *shape] float32})` for one block.

    Each model's tensors are read straight into their row of the task-vector buffer (float32 files on
    CPU) and the base is subtracted in place."""
    base_t = base.read(block.tensors)
    for n, t in base_t.items():
        _check_base(base, n, t)
    shapes = {n: tuple(t.shape) for n, t in base_t.items()}
    tvs = (arena or Arena(device)).views(len(models), shapes)
    for k, ckpt in enumerate(models):
        ckpt.read_into({n: tvs[n][k] for n in block.tensors})
    for n, t in base_t.items():
        tvs[n].sub_(t.to(device=device, dtype=torch.float32))
    return base_t, tvs


ROWS = 1 << 19  # entries per row range of one model's tensor (2 MiB of float32)


def spans(shape: tuple[int, ...]) -> list[tuple[int, int] | None]:
    """Row ranges (along dim 0) of a tensor of `shape`, about `ROWS` entries each; [None]: the whole tensor
    (0-D and 1-D tensors, which are small, are not cut)."""
    if len(shape) < 2:
        return [None]
    step = max(1, ROWS // max(math.prod(shape[1:]), 1))
    return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]


def read_rows(ckpt: Checkpoint, name: str, span: tuple[int, int] | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [a, b) of a tensor (None: all of it), only their bytes, read from the file at their offset (into
    `out` when given, cast to its dtype): no memory map, whose touched pages would count as resident as
    long as the file stays open."""
    if hasattr(ckpt, "read_rows"):  # a checkpoint that serves some tensors itself (vocab.Reindexed)
        return ckpt.read_rows(name, span, out)
    shape, dtype = tuple(ckpt.shape[name]), ckpt.dtype[name]
    if dtype.itemsize * math.prod(shape) != ckpt.nbytes(name):  # packed dtypes: safetensors' own slicing
        t = ckpt.read_part(name, () if span is None else (span,))
        return t if out is None else out.copy_(t)
    start, part = (0, shape) if span is None else (span[0], (span[1] - span[0], *shape[1:]))
    direct = out is not None and out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
    into = out if direct else torch.empty(part, dtype=dtype)
    view = memoryview(tensor_bytes(into))
    with open(ckpt.file_of[name], "rb", buffering=0) as f:
        f.seek(ckpt.offset[name] + start * dtype.itemsize * math.prod(shape[1:]))
        if f.readinto(view) != len(view):
            raise ValueError(f"{ckpt.file_of[name]}: tensor {name} is truncated")
    return into if out is None or direct else out.copy_(into)


def task_vector_rows(models: list[Checkpoint], name: str, span, base_rows: torch.Tensor, device: str) -> torch.Tensor:
    """τ_k = θ_k − θ_0 of rows `span` for every model, `[K, rows, ...]` float32, as `read_task_vectors` forms
    them; `base_rows` the base's rows in float32."""
    out = torch.empty((len(models), *base_rows.shape), dtype=torch.float32)
    for k, ckpt in enumerate(models):
        read_rows(ckpt, name, span, out[k])
    return out.to(device).sub_(base_rows.to(device))


def check_finite(models: list[Checkpoint], name: str, tv: torch.Tensor, sq_norms: np.ndarray) -> None:
    for k in np.flatnonzero(~np.isfinite(sq_norms)):
        if not torch.isfinite(tv[k]).all():
            raise ValueError(f"{models[k].file_of[name]}: tensor {name} has non-finite values (NaN or Inf)")


def scan(
    base: Checkpoint,
    models: list[Checkpoint],
    blocks: list[Block],
    *,
    device: str = "cpu",
    signs: bool = False,
    histograms: bool = False,
    on_block: Callable[[int, Block, dict, dict, Stats], None] | None = None,
) -> Stats:
    stats = Stats()
    digest = hashlib.blake2b(digest_size=16)
    M = len(models)
    stats.task_matrix_sq_norms = np.zeros(M)
    if histograms:
        stats.histogram = torch.zeros((M, 32768), dtype=torch.int64)
    # One arena, no read-ahead: reading the next block while this one is processed would hold a second
    # M + 1 blocks and break the (M + 2)-block memory bound.
    arena = Arena(device)
    for b, block in enumerate(tqdm(blocks, desc="scan", unit="block", disable=None, leave=False)):
        sums = _BlockSums(M, signs)
        if on_block is None:  # a tensor and a few rows at a time: no block-sized buffer
            for n in block.tensors:
                digest.update(f"{n}|{base.dtype[n]}|{tuple(base.shape[n])}".encode())
                for span in spans(base.shape[n]):
                    base_rows = read_rows(base, n, span)
                    _check_base(base, n, base_rows)
                    tv = task_vector_rows(models, n, span, base_rows.float(), device)
                    _accumulate(stats, sums, digest, models, n, base_rows, tv, histograms)
            sums.finish(stats)
            continue
        base_t, tvs = read_task_vectors(base, models, block, device, arena)
        for n in block.tensors:
            t = base_t[n]
            digest.update(f"{n}|{t.dtype}|{tuple(t.shape)}".encode())
            _accumulate(stats, sums, digest, models, n, t, tvs[n], histograms)
        sums.finish(stats)
        on_block(b, block, base_t, tvs, stats)
        del base_t, tvs
    stats.base_hash = digest.hexdigest()
    return stats


class _BlockSums:
    """One block's Gram (and optional sign-agreement) matrix and entry count, gathered tensor part by part."""

    def __init__(self, M: int, signs: bool):
        self.gram = np.zeros((M, M))
        self.sign = np.zeros((M, M)) if signs else None
        self.numel = 0

    def finish(self, stats: Stats) -> None:
        stats.grams.append(self.gram)
        stats.signs.append(self.sign)
        stats.numels.append(self.numel)


def _accumulate(stats: Stats, sums: _BlockSums, digest, models, name: str, base_part: torch.Tensor, tv: torch.Tensor,
                histograms: bool) -> None:
    """Add one part of a tensor (all of it, or some rows): the base's bytes to the hash, its task vectors `tv`
    `[M, ...]` to the block's Gram (and sign) matrix, the norms and the histograms."""
    M = len(models)
    digest.update(tensor_bytes(base_part))
    flat = tv.reshape(M, -1)
    sums.numel += flat.shape[1]
    g = (flat @ flat.T).double().cpu().numpy()
    check_finite(models, name, tv, np.diag(g))
    sums.gram += g
    if base_part.dim() >= 2:
        tf = base_part.reshape(-1).float()
        stats.base_sq_norm += float(torch.dot(tf, tf))
        stats.task_matrix_sq_norms += np.diag(g)
    if sums.sign is not None:
        s = flat.sign()
        sums.sign += (s @ s.T).double().cpu().numpy()
    if histograms:
        stats.histogram += magnitude_histogram(flat).cpu()

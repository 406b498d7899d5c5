"""The single streaming pass over all checkpoints.

For one block at a time it reads the base and every model, forms the task vectors τ_k = θ_k − θ_0 in one
`[M, numel]` float32 buffer per tensor (each model's copy is dropped right after subtracting), and
accumulates what planning needs: the Gram matrix of the block (cosine and Euclidean similarities both
follow from it), optionally the sign-agreement matrix and magnitude histograms for `scope: global`, the
squared norms used by the base-distance check and a hash of the base. Peak memory is about 2(M + 1)
blocks in float32: this block's task vectors and base, and the next block's, read ahead. A caller can also look at each block's task vectors while they are in memory (`on_block`), with
the statistics gathered so far (including this block's Gram matrix).

Finiteness is checked through the Gram diagonal: Σ τ² is non-finite whenever any entry is, so the full
element-wise check only runs to name the culprit.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
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


def read_task_vectors(base: Checkpoint, models: list[Checkpoint], block: Block, device: str,
                      arena: Arena | None = None) -> tuple[dict, dict]:
    """`(base tensors, {name: τ [M, *shape] float32})` for one block.

    Each model's tensors are read straight into their row of the task-vector buffer (float32 files on
    CPU) and the base is subtracted in place."""
    base_t = base.read(block.tensors)
    for n, t in base_t.items():
        if t.is_floating_point() and not torch.isfinite(t.float().sum()) and not torch.isfinite(t).all():
            raise ValueError(f"{base.file_of[n]}: tensor {n} of the base has non-finite values")
    shapes = {n: tuple(t.shape) for n, t in base_t.items()}
    tvs = (arena or Arena(device)).views(len(models), shapes)
    for k, ckpt in enumerate(models):
        ckpt.read_into({n: tvs[n][k] for n in block.tensors})
    for n, t in base_t.items():
        tvs[n].sub_(t.to(device=device, dtype=torch.float32))
    return base_t, tvs


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
    # Two arenas: a reader thread fills the next block's while this one is being processed (file reads
    # and torch kernels release the GIL), so I/O overlaps the Gram products.
    arenas = [Arena(device), Arena(device)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(read_task_vectors, base, models, blocks[0], device, arenas[0]) if blocks else None
        for b, block in enumerate(tqdm(blocks, desc="scan", unit="block", disable=None, leave=False)):
            base_t, tvs = future.result()
            if b + 1 < len(blocks):
                future = pool.submit(read_task_vectors, base, models, blocks[b + 1], device, arenas[(b + 1) % 2])
            _accumulate(stats, digest, models, block, base_t, tvs, signs, histograms)
            if on_block is not None:
                on_block(b, block, base_t, tvs, stats)
            del base_t, tvs
    stats.base_hash = digest.hexdigest()
    return stats


def _accumulate(stats: Stats, digest, models, block: Block, base_t: dict, tvs: dict, signs: bool, histograms: bool) -> None:
    """One block's Gram (and optional sign) matrix, norms, histograms and base hash."""
    M = len(models)
    gram = np.zeros((M, M))
    sign = np.zeros((M, M)) if signs else None
    numel = 0
    for n in block.tensors:
        t = base_t[n]
        digest.update(f"{n}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(tensor_bytes(t))
        flat = tvs[n].reshape(M, -1)
        numel += flat.shape[1]
        g = (flat @ flat.T).double().cpu().numpy()
        check_finite(models, n, tvs[n], np.diag(g))
        gram += g
        if t.dim() >= 2:
            tf = t.reshape(-1).float()
            stats.base_sq_norm += float(torch.dot(tf, tf))
            stats.task_matrix_sq_norms += np.diag(g)
        if signs:
            s = flat.sign()
            sign += (s @ s.T).double().cpu().numpy()
        if histograms:
            stats.histogram += magnitude_histogram(flat).cpu()
    stats.grams.append(gram)
    stats.signs.append(sign)
    stats.numels.append(numel)

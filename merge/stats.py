"""The single streaming pass over all checkpoints.

For one block at a time it reads the base and every model, forms the task vectors τ_k = θ_k − θ_0 in one
`[M, numel]` float32 buffer per tensor (each model's copy is dropped right after subtracting), and
accumulates what planning needs: the Gram matrix of the block (cosine and Euclidean similarities both
follow from it), optionally the sign-agreement matrix and magnitude histograms for `scope: global`, the
squared norms used by the base-distance check and a hash of the base. Peak memory is about (M + 2)
blocks. A caller can also look at each block's task vectors while they are in memory (`on_block`), with
the statistics gathered so far (including this block's Gram matrix).

Finiteness is checked through the Gram diagonal: Σ τ² is non-finite whenever any entry is, so the full
element-wise check only runs to name the culprit.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from merge.blocks import Block
from merge.io import Checkpoint, tensor_bytes
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


def read_task_vectors(base: Checkpoint, models: list[Checkpoint], block: Block, device: str) -> tuple[dict, dict]:
    """`(base tensors, {name: τ [M, *shape] float32})` for one block."""
    base_t = base.read(block.tensors)
    for n, t in base_t.items():
        if t.is_floating_point() and not torch.isfinite(t.float().sum()) and not torch.isfinite(t).all():
            raise ValueError(f"{base.file_of[n]}: tensor {n} of the base has non-finite values")
    base_f = {n: t.to(device=device, dtype=torch.float32) for n, t in base_t.items()}
    tvs = {n: torch.empty((len(models), *t.shape), dtype=torch.float32, device=device) for n, t in base_t.items()}
    for k, ckpt in enumerate(models):
        for n, t in ckpt.read(block.tensors).items():
            torch.sub(t.to(device=device, dtype=torch.float32), base_f[n], out=tvs[n][k])
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
    for b, block in enumerate(tqdm(blocks, desc="scan", unit="block", disable=None, leave=False)):
        base_t, tvs = read_task_vectors(base, models, block, device)
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
        if on_block is not None:
            on_block(b, block, base_t, tvs, stats)
        del base_t, tvs
    stats.base_hash = digest.hexdigest()
    return stats

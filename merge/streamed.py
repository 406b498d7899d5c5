"""The write pass a tensor and a few rows at a time, for the methods that allow it (`Method.rows_apart`).

A merged group's tensor is made in row ranges (along dim 0): the base's and the members' rows are read
(`stats.read_rows`, from the files at the tensors' offsets), their task-vector rows formed and combined by the method, the base added and the
rows written. The whole-tensor sums a method needs (`Method.stats`: slerp's norms, model stock's Gram
matrix) are gathered first, in a pass over the same row ranges. The per-task step (`prepare`: trims,
random drops and their rescaling) needs one task's whole tensor: it runs one task and one tensor at a
time, and its result is spilled to a scratch file in the output's temporary folder, which the row
ranges then read back. Memory: one task's tensor and what its preparation takes (3 × the tensor for
mergekit's tie rule, which sorts it), plus buffers of a few rows; never a block's M task vectors.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from merge import methods
from merge.io import ShardWriter, tensor_bytes
from merge.stats import read_rows, spans, task_vector_rows


class Prepared:
    """The prepared task vectors (`methods.prepare`) of the floating tensors of a block, for the tasks
    `tasks`, computed one (task, tensor) at a time and kept in the file `path`."""

    def __init__(self, session, block, tasks: list[int], thresholds, path: Path):
        self.offset: dict[tuple[int, str], int] = {}
        self.shape = {}
        self.file = open(path, "w+b")
        floats = [n for n in block.tensors if session.base.dtype[n].is_floating_point]
        # one buffer for every (task, tensor): freeing and allocating tensor-sized buffers leaves glibc's heap
        # holding freed ones
        buffer = torch.empty(max((math.prod(session.base.shape[n]) for n in floats), default=0), dtype=torch.float32)
        for s in session.settings(block):
            for n in s.names:
                if n not in floats:
                    continue
                self.shape[n] = session.base.shape[n]
                for k in tasks:
                    tv = read_rows(session.models[k], n, None, buffer[: math.prod(self.shape[n])].view(self.shape[n]))
                    for span in spans(self.shape[n]):  # minus the base, read by rows: it is never whole
                        (tv if span is None else tv[span[0] : span[1]]).sub_(read_rows(session.base, n, span).float())
                    ctx = session.context(block, (k,), thresholds, s)
                    row = methods.prepare(session.method, {n: tv.to(session.spec.device).unsqueeze(0)}, ctx, in_place=True)[n]
                    if row.shape[1:] != tv.shape or row.dtype != torch.float32:
                        raise RuntimeError(f"{session.method.name}: its preparation changes tensor {n}; it cannot run by rows")
                    self.offset[(k, n)] = self.file.tell()
                    self.file.write(memoryview(tensor_bytes(row[0].cpu())))
                    del row

    def rows(self, tasks, name: str, span) -> torch.Tensor:
        """Rows `span` of the prepared tensors `name` of `tasks`, `[K, rows, ...]` float32."""
        shape = tuple(self.shape[name])
        start, part = (0, shape) if span is None else (span[0], (span[1] - span[0], *shape[1:]))
        out = torch.empty((len(tasks), *part), dtype=torch.float32)
        for i, k in enumerate(tasks):
            view = memoryview(tensor_bytes(out[i]))
            self.file.seek(self.offset[(k, name)] + start * 4 * math.prod(shape[1:]))
            if self.file.readinto(view) != len(view):
                raise RuntimeError(f"prepared tensor {name} of task {k} is truncated in {self.file.name}")
        return out

    def close(self) -> None:
        self.file.close()
        Path(self.file.name).unlink(missing_ok=True)


def write_group(session, block, members: tuple[int, ...], suffix: str, writer: ShardWriter, prepared: Prepared | None) -> None:
    """Merge the group `members` of `block` and write its tensors (named with `suffix`), row range by row
    range; equal to `Session.merge_group` on the whole block plus the base."""
    method, dev = session.method, session.spec.device
    setting_of = {n: s for s in session.settings(block) for n in s.names}
    for n in block.tensors:
        if not session.base.dtype[n].is_floating_point:  # not merged: all members share the base's
            writer.add(n + suffix, session.base.read([n])[n])
            continue
        shape, dtype = session.base.shape[n], session.out_dtype(n)
        ctx = session.context(block, members, None, setting_of[n])

        def rows(span):
            base_rows = read_rows(session.base, n, span).to(device=dev, dtype=torch.float32)
            if prepared is None:
                return base_rows, task_vector_rows([session.models[k] for k in members], n, span, base_rows, dev)
            return base_rows, prepared.rows(members, n, span).to(dev)

        if method.stats is not None:
            total = {}
            for span in spans(shape):
                base_rows, tv = rows(span)
                ctx.base = {n: base_rows}
                for key, v in method.stats({n: tv}, ctx).items():
                    total[key] = total[key] + v if key in total else v
            ctx.stats = total

        def parts():
            for span in spans(shape):
                base_rows, tv = rows(span)
                ctx.base = {n: base_rows}
                yield torch.add(method.fn({n: tv}, ctx).vector[n], base_rows).to(dtype)

        writer.add_parts(n + suffix, dtype, shape, math.prod(shape) * dtype.itemsize, parts())

"""Run a function on N gloo ranks in fresh processes and collect what each returns (or raises).

Every rank gets a short collective timeout and the parent a wall-clock limit, so a hang fails the test
instead of blocking CI. Processes are started with `spawn` (no state inherited from pytest)."""
from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ranks are CPU processes on gloo even on a GPU machine, with Triton through its interpreter; set before the
# child starts, since unpickling the rank function imports torch and the kernels. Their collectives go through
# torch.distributed, as NCCL's do, not the host channel of CPU ranks (tests/parallel/test_host_channel.py, and
# the servers the serving tests start, run that; `env` turns it on).
CHILD_ENV = {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
             "TESSERA_HOST_CHANNEL": "0"}


def _entry(fn, rank, world, port, queue, args, timeout_s):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        from engine.parallel import init_distributed

        init_distributed(timeout_s=timeout_s)
        torch.manual_seed(0)
        # Plain pickle bytes: tensors put on a torch queue are shared through file descriptors that vanish when
        # this process exits before the parent reads them.
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException as e:  # report every failure to the parent, with its type
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, limit_s: float = 120, timeout_s: float = COLLECTIVE_TIMEOUT_S,
              env: dict | None = None) -> list:
    """Results of `fn(rank, world, *args)` on every rank, rank order; raises if any rank failed or hung."""
    outcomes = run_ranks_raw(fn, world, *args, limit_s=limit_s, timeout_s=timeout_s, env=env)
    errors = [f"rank {r}: {msg}" for r, (status, msg) in enumerate(outcomes) if status != "ok"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [pickle.loads(value) for _, value in outcomes]


def run_ranks_raw(fn, world: int, *args, limit_s: float = 120, timeout_s: float = COLLECTIVE_TIMEOUT_S,
                  env: dict | None = None) -> list:
    """[(status, value-or-message)] per rank; status "ok" (value pickled), "error" or "hung"."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue, args, timeout_s)) for r in range(world)]
    child_env = {**CHILD_ENV, **(env or {})}
    saved = {k: os.environ.get(k) for k in child_env}
    os.environ.update(child_env)
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results = {}
    import queue as queue_module
    import time

    deadline = time.monotonic() + limit_s
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, status, value = queue.get(timeout=max(deadline - time.monotonic(), 0.1))
            results[rank] = (status, value)
        except queue_module.Empty:
            break
    for p in procs:
        p.join(timeout=max(deadline - time.monotonic(), 1))
        if p.is_alive():
            p.kill()
            p.join()
    return [results.get(r, ("hung", f"no result within {limit_s}s")) for r in range(world)]

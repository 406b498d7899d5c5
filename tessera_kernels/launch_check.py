"""Compile every Triton kernel the way a launch on a GPU would, on a machine without one, and fail where the GPU
would refuse it.

`StandInDriver` is Triton's CUDA driver with the hardware taken out: it reports a GPU (name, compute
capability, shared memory per block), its launcher does nothing, and meta tensors stand for device memory (a
meta tensor's `data_ptr()` is its byte offset, so pointer alignment is that of a fresh allocation plus the
view's offset). The real launchers then run unchanged through Triton's JIT, which specialises each argument as
on the GPU (unit strides and sizes become constants, 16-divisible pointers and integers get divisibility hints,
which let the pipeliner use `cp.async` and multiply shared memory per stage), compiles with ptxas, and raises
`OutOfResources` where the GPU would. Each compiled kernel is recorded with ptxas's own report (`-v`), once per
distinct specialisation (Triton's in-memory cache dedupes repeats).

`CASES` is the registration list: functions that, with a stand-in driver active, yield `(label, launch)` pairs
where `launch()` calls a real launcher on meta tensors. To check a new kernel, append its function.

    python -m tessera_kernels.launch_check            # sm_80, sm_89, sm_90 and every tuned file; exit 1 on a failure
    python -m tessera_kernels.launch_check --arch 86  # one target
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import torch

from tessera_kernels.moe_configs import (CONFIG_DIR, PUBLISHED_SHAPES, SAFE_TABLES, SHARED_MEMORY_LIMITS, SLICES,
                                         generation)

ARCHS = (80, 86, 89, 90)
# sm_86 and sm_89 share their shared-memory limit and Triton's code generation: every kernel compiled for both
# gave identical shared memory, registers and spills, so by default sm_89 stands for both (--arch 86 checks it).
DEFAULT_ARCHS = (80, 89, 90)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TOKEN_COUNTS = (1, 2, 3, 8, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SPILL_LIMIT = 16  # bytes of register spill stores tolerated: a few words
BERT_MOE_SHAPE = (8, 384, 1536, 2)  # minilm-moe (experts, hidden, FFN, top-k): all-MiniLM-L6-v2 upcycled


@dataclass
class Compiled:
    arch: int
    device: str
    kernel: str
    config: str
    shared: int
    registers: int
    spills: int
    problem: str = ""  # empty when the GPU would run it


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


class _Utils:
    """What Triton asks the CUDA driver's C helpers about the device."""

    def __init__(self, driver: "StandInDriver"):
        self.driver = driver

    def get_device_properties(self, device):
        return {"max_shared_mem": self.driver.shared_limit, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1755000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, 1024  # module, function, registers, spills (reported by ptxas), max threads


def _stand_in_driver_class():
    from triton.backends.nvidia.driver import CudaDriver

    class StandInDriver(CudaDriver):
        """A CUDA driver for a GPU that is not there (see the module docstring)."""

        def __init__(self, arch: int, device_name: str | None = None):
            # CudaDriver.__init__ builds its C helpers against libcuda; nothing here needs them.
            self.arch = arch
            self.device_name = device_name or f"stand-in sm_{arch}"
            self.shared_limit = SHARED_MEMORY_LIMITS[arch]
            self.utils = _Utils(self)
            self.launcher_cls = self._launcher
            self.compiled: list[Compiled] = []
            self.seen: set[str] = set()
            self.launches = 0
            self.ptxas_log = io.StringIO()

        @staticmethod
        def is_active():
            return False

        def get_current_target(self):
            from triton.backends.compiler import GPUTarget

            return GPUTarget("cuda", self.arch, 32)

        def get_current_device(self):
            return self.arch  # one JIT cache per target

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return divmod(self.arch, 10)

        def get_active_torch_device(self):
            return torch.device("meta")

        def _launcher(self, src, metadata):
            """Triton builds the launcher once per compiled kernel, right after ptxas and before its shared
            memory check: the place to record the kernel."""
            log = self.ptxas_log.getvalue()
            self.ptxas_log.seek(0)
            self.ptxas_log.truncate()
            registers = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
            spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", log)]
            if not registers:  # Triton's disk cache had it: another launch key for a kernel already seen
                if metadata.hash in self.seen:
                    return self._launch
                raise RuntimeError(f"no ptxas report for {src.name}: is TRITON_DUMP_PTXAS_LOG set and the cache fresh?")
            self.seen.add(metadata.hash)
            entry = Compiled(self.arch, self.device_name, src.name, _describe(src, metadata), metadata.shared,
                             max(registers), max(spills, default=0))
            if entry.shared > self.shared_limit:
                entry.problem = f"shared memory {entry.shared} > {self.shared_limit}"
            elif entry.spills > SPILL_LIMIT:
                entry.problem = f"spills {entry.spills} B"
            self.compiled.append(entry)
            return self._launch

        def _launch(self, *args, **kwargs):
            self.launches += 1

    return StandInDriver


def _describe(src, metadata) -> str:
    """Constexpr arguments (declared or specialised), dtype of the first pointer, warps and stages."""
    names = src.fn.arg_names
    values = {names[path[0]]: value for path, value in src.constants.items() if len(path) == 1}
    skip = {"PRECISION", "UPCAST", "DOT_FP32"}
    declared = [f"{names[i]}={values[names[i]]}" for i in src.fn.constexprs if names[i] in values and names[i] not in skip]
    unit = [name for name, value in values.items() if src.fn.arg_names.index(name) not in src.fn.constexprs]
    dtype = next((t[1:] for t in src.signature.values() if isinstance(t, str) and t.startswith("*")), "")
    text = f"{dtype} {' '.join(declared)} w{metadata.num_warps} s{metadata.num_stages}"
    return text + (f" const:{','.join(unit)}" if unit else "")


# ---------------------------------------------------------------- registered launches


def moe_cases():
    """`fused_experts` for every published family, whole and as each MoEShard rank's slice, in every dtype and
    at 1 to 32k tokens, with the weights laid out as the engine holds them (one merged gate/up tensor)."""
    from tessera_kernels.fused_moe import fused_experts

    for family, (experts, hidden, ffn, top_k, gated, activation, fp32_weights) in PUBLISHED_SHAPES.items():
        widths = sorted({w for g in SLICES for w in (ffn // g, -(-ffn // g))})
        for dtype in DTYPES:
            for width in widths:
                first = _meta(experts, 2 * width if gated else width, hidden, dtype=dtype)
                w1, w3 = (first[:, :width], first[:, width:]) if gated else (first, None)
                w2 = _meta(experts, hidden, width, dtype=dtype)
                for tokens in TOKEN_COUNTS:
                    x = _meta(tokens, hidden, dtype=dtype)
                    ids = _meta(tokens, top_k, dtype=torch.int64)
                    weights = _meta(tokens, top_k, dtype=torch.float32 if fp32_weights else dtype)
                    yield (f"{family} F={width} {dtype} T={tokens}",
                           functools.partial(fused_experts, x, ids, weights, w1, w2, w3, activation))


def bias_and_ep_cases():
    """The two other ways the engine calls `fused_experts`: BERT-MoE's biased, ungated GELU experts (the served
    default, minilm-moe, as a whole and as MoEShard slices), and expert parallelism's chunk, where each rank runs
    whole experts, E / G of them, over received rows at top-1 with no routing weights."""
    from tessera_kernels.fused_moe import fused_experts

    experts, hidden, ffn, top_k = BERT_MOE_SHAPE
    for dtype in DTYPES:
        for width in sorted({-(-ffn // g) for g in SLICES}):
            w1, w2 = _meta(experts, width, hidden, dtype=dtype), _meta(experts, hidden, width, dtype=dtype)
            b1, b2 = _meta(experts, width, dtype=dtype), _meta(experts, hidden, dtype=dtype)
            for tokens in TOKEN_COUNTS:
                x, ids = _meta(tokens, hidden, dtype=dtype), _meta(tokens, top_k, dtype=torch.int64)
                weights = _meta(tokens, top_k, dtype=dtype)
                yield (f"bert-moe F={width} {dtype} T={tokens}",
                       functools.partial(fused_experts, x, ids, weights, w1, w2, None, "gelu", b1=b1, b2=b2))
    for family, (experts, hidden, ffn, _, gated, activation, _) in PUBLISHED_SHAPES.items():
        for dtype in DTYPES:
            for local in sorted({max(1, experts // g) for g in SLICES[1:]}):
                first = _meta(local, 2 * ffn if gated else ffn, hidden, dtype=dtype)
                w1, w3 = (first[:, :ffn], first[:, ffn:]) if gated else (first, None)
                w2 = _meta(local, hidden, ffn, dtype=dtype)
                for rows in (1, 64, 4096, 32768):
                    x, ids = _meta(rows, hidden, dtype=dtype), _meta(rows, 1, dtype=torch.int64)
                    yield (f"ep {family} E_r={local} {dtype} rows={rows}",
                           functools.partial(fused_experts, x, ids, None, w1, w2, w3, activation))


def lora_cases():
    """The per-row LoRA mixture at the families' hidden sizes, so that every block size its launcher derives is
    reached: decode rows (one token, split reduction) and prefill rows, ranks 16 and 64, one and three adapters."""
    from tessera_kernels.lora_mixture import lora_mixture_triton

    sizes = sorted({hidden for _, hidden, *_ in PUBLISHED_SHAPES.values()})
    # (rows, tokens per row, rank, adapters per row, split of the shrink's reduction)
    shapes = [(1, 1, 16, 1, 4), (16, 1, 64, 3, 4), (4, 32, 16, 3, 1), (2, 512, 64, 1, 1)]
    for dtype in DTYPES:
        for d in sizes:
            for rows, per_row, rank, k, split in shapes:
                x, y = _meta(rows * per_row, d, dtype=dtype), _meta(rows * per_row, d, dtype=dtype)
                a, b = _meta(8, rank, d, dtype=dtype), _meta(8, d, rank, dtype=dtype)
                slots, weights = _meta(rows, k, dtype=torch.int32), _meta(rows, k, dtype=torch.float32)
                yield (f"lora d={d} r={rank} rows={rows}x{per_row} K={k} split={split} {dtype}",
                       functools.partial(lora_mixture_triton, x, y, a, b, slots, weights, split))


def routing_cases():
    """The one-launch router (`tessera_kernels.routing`) for every published family's experts, top-k and hidden size,
    in every dtype, at decode and prefill token counts, with routing counts tracked (its atomics included)."""
    from tessera_kernels.routing import fused_route

    for family, (experts, hidden, _, top_k, _, _, fp32_weights) in PUBLISHED_SHAPES.items():
        switch = family.startswith("switch")
        for dtype in DTYPES:
            weights_dtype = dtype if switch or not fp32_weights else torch.float32
            for tokens in (1, 16, 32768):
                args = (_meta(tokens, hidden, dtype=dtype), _meta(experts, hidden, dtype=dtype), None, top_k)
                yield (f"route {family} {dtype} T={tokens}",
                       functools.partial(fused_route, *args, switch=switch, normalize=not switch,
                                         weights_dtype=weights_dtype, bad_flag=_meta(1, dtype=torch.int32),
                                         counts=_meta(experts + 1, dtype=torch.int64)))


def lora_sgmv_cases():
    """The packed, adapter-grouped LoRA mixture (tessera_kernels.lora_sgmv) at the families' hidden sizes: decode and
    prefill token counts, ranks 16 and 64, one adapter per token (expand in place) and three (fp32 atomics),
    and the expert-LoRA shapes (FFN-wide inputs and outputs). The grouping is given, as meta tensors cannot
    run its data-dependent indexing."""
    from tessera_kernels.lora_sgmv import BLOCK_M, lora_sgmv_triton

    dims = sorted({(h, h) for _, h, *_ in PUBLISHED_SHAPES.values()}
                  | {(h, 2 * f) for _, h, f, *_ in PUBLISHED_SHAPES.values()}
                  | {(f, h) for _, h, f, *_ in PUBLISHED_SHAPES.values()})
    for dtype in DTYPES:
        for d_in, d_out in dims:
            for tokens, rank, k in [(1, 16, 1), (16, 64, 3), (512, 16, 1), (4096, 64, 3)]:
                n_slots = 8
                tiles = tokens * k // BLOCK_M + n_slots + 1
                x, y = _meta(tokens, d_in, dtype=dtype), _meta(tokens, d_out, dtype=dtype)
                a, b = _meta(n_slots, rank, d_in, dtype=dtype), _meta(n_slots, d_out, rank, dtype=dtype)
                slots, weights = _meta(tokens, k, dtype=torch.int32), _meta(tokens, k, dtype=torch.float32)
                grouping = (_meta(tiles * BLOCK_M, dtype=torch.int32), _meta(tiles, dtype=torch.int32))
                yield (f"lora_sgmv {d_in}->{d_out} r={rank} T={tokens} K={k} {dtype}",
                       functools.partial(lora_sgmv_triton, x, y, a, b, slots, weights, grouping))


CASES = [moe_cases, bias_and_ep_cases, lora_cases, lora_sgmv_cases, routing_cases]


# ---------------------------------------------------------------- launch counting

# Aten ops that allocate or make views: on CUDA they launch no kernel.
NO_KERNEL_OPS = {"empty", "empty_strided", "view", "_unsafe_view", "as_strided", "slice", "select", "t",
                 "transpose", "permute", "unsqueeze", "squeeze", "expand", "alias", "detach", "_reshape_alias",
                 "lift_fresh"}


def count_launches(fn, *args, **kwargs) -> tuple[int, list[str]]:
    """(Triton launches, torch ops that would launch CUDA kernels) of one call of `fn` on meta tensors, with a
    stand-in driver active. Kernels are compiled on first use, so count after a warm-up call."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import driver

    ops = []

    class KernelOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in NO_KERNEL_OPS:
                ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    stand_in = driver.active
    before = stand_in.launches
    with KernelOps():
        fn(*args, **kwargs)
    return stand_in.launches - before, ops


def decode_launch_problems() -> list[str]:
    """The expert path of one MoE layer at decode (1 and 8 tokens) makes exactly the launches
    `fused_experts_launches` documents, all of them Triton kernels."""
    from tessera_kernels.fused_moe import fused_experts, fused_experts_launches

    problems = []
    for family, (experts, hidden, ffn, top_k, gated, activation, _) in PUBLISHED_SHAPES.items():
        first = _meta(experts, 2 * ffn if gated else ffn, hidden, dtype=torch.bfloat16)
        w1, w3 = (first[:, :ffn], first[:, ffn:]) if gated else (first, None)
        w2 = _meta(experts, hidden, ffn, dtype=torch.bfloat16)
        for tokens in (1, 8):
            args = (_meta(tokens, hidden, dtype=torch.bfloat16), _meta(tokens, top_k, dtype=torch.int64),
                    _meta(tokens, top_k, dtype=torch.bfloat16), w1, w2, w3, activation)
            fused_experts(*args)
            launches, ops = count_launches(fused_experts, *args)
            want = fused_experts_launches(tokens, top_k, experts)
            if launches != want or ops:
                problems.append(f"{family} at {tokens} tokens: {launches} Triton launches (documented: {want}), "
                                f"torch ops that launch kernels: {ops}")
    return problems


def failure_report_problems() -> list[str]:
    """A configuration the GPU cannot run fails with an error naming the kernel, configuration and device."""
    from tessera_kernels.fused_moe import fused_experts

    too_big = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_SIZE_M=1, num_warps=4, num_stages=8)
    w13 = _meta(8, 256, 512, dtype=torch.bfloat16)
    args = (_meta(4, 512, dtype=torch.bfloat16), _meta(4, 2, dtype=torch.int64), None, w13[:, :128],
            _meta(8, 512, 128, dtype=torch.bfloat16), w13[:, 128:])
    from triton.runtime import driver

    recorded = len(driver.active.compiled)
    try:
        fused_experts(*args, config=too_big)
    except RuntimeError as error:
        del driver.active.compiled[recorded:]  # the deliberate failure is not a finding
        if all(word in str(error) for word in ("expert_up", "stand-in sm_90", "'num_stages': 8")):
            return []
        return [f"an over-limit launch raised an unclear error: {error}"]
    return ["an over-limit launch did not fail"]


# ---------------------------------------------------------------- running


def check_target(arch: int, device_name: str | None = None) -> tuple[list[Compiled], list[str]]:
    """Every registered launch on one stand-in GPU: (kernels it compiled, launches that failed otherwise)."""
    from triton.runtime import driver
    from triton.runtime.errors import OutOfResources

    stand_in = _stand_in_driver_class()(arch, device_name)
    driver.set_active(stand_in)
    errors = []
    with contextlib.redirect_stdout(stand_in.ptxas_log):
        for cases in CASES:
            for label, launch in cases():
                try:
                    launch()
                except OutOfResources:
                    pass  # recorded with the kernel
                except Exception as error:  # noqa: BLE001 - a compile error is a finding, reported below
                    errors.append(f"sm_{arch} {label}: {type(error).__name__}: {str(error)[:400]}")
        if arch == 90 and device_name is None:
            errors += decode_launch_problems() + failure_report_problems()
    return stand_in.compiled, errors


def check_arch(arch: int, tuned_devices: list[str]) -> tuple[list[Compiled], list[str]]:
    """The generation's safe tables, then each tuned file for a GPU of this capability (in one process, so
    kernels compiled for the first are not compiled again)."""
    compiled, errors = check_target(arch)
    errors += coverage_gaps(compiled, arch)
    for name in tuned_devices:
        more, more_errors = check_target(arch, name)
        compiled, errors = compiled + more, errors + more_errors
    return compiled, errors


def tuned_devices() -> dict[int, list[str]]:
    """Capability -> device names of the tuned config files, so each file is compiled for its own GPU."""
    devices: dict[int, set[str]] = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        meta = json.loads(path.read_text())
        devices.setdefault(int(meta["capability"]), set()).add(meta["device"])
    return {arch: sorted(names) for arch, names in devices.items()}


def coverage_gaps(compiled: list[Compiled], arch: int) -> list[str]:
    """Safe-table entries of this target's generation that no launch compiled."""
    seen = {c.config for c in compiled if c.kernel == "_expert_up_kernel"}
    gaps = []
    for (gen, size), table in SAFE_TABLES.items():
        if gen != generation(arch):
            continue
        for _, cfg in table:
            want = (f"BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} BLOCK_K={cfg['BLOCK_K']} "
                    f"GROUP_SIZE_M={cfg['GROUP_SIZE_M']}")
            suffix = f"w{cfg['num_warps']} s{cfg['num_stages']}"
            if not any(want in s and suffix in s and (s.startswith("fp32") == (size == 4)) for s in seen):
                gaps.append(f"sm_{arch}: table entry {cfg} ({size}-byte dtypes) was never compiled")
    return gaps


def _run(job):
    return check_arch(*job)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="check only these targets")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("tessera_kernels.launch_check compiles for GPUs: run it without TRITON_INTERPRET=1")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="tessera-launch-check-")  # every kernel through ptxas
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    tuned = tuned_devices()
    unknown = sorted(set(tuned) - set(SHARED_MEMORY_LIMITS))
    archs = set(args.arch or DEFAULT_ARCHS) | (set() if args.arch else set(tuned) - set(unknown))
    jobs = [(arch, tuned.get(arch, [])) for arch in sorted(archs, reverse=True)]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_run, jobs))
    compiled = [c for kernels, _ in results for c in kernels]
    problems = [e for _, errors in results for e in errors]
    problems += [f"tuned files for sm_{arch}, which the check has no shared-memory limit for" for arch in unknown]
    print(f"{'arch':<6} {'device':<24} {'kernel':<22} {'shared B':>9} {'regs':>5} {'spill B':>7}  config")
    for c in sorted(compiled, key=lambda c: (c.arch, c.device, c.kernel, c.config)):
        flag = f"  <-- {c.problem}" if c.problem else ""
        print(f"sm_{c.arch:<3} {c.device[:24]:<24} {c.kernel:<22} {c.shared:>9} {c.registers:>5} {c.spills:>7}  "
              f"{c.config}{flag}")
    problems += [f"sm_{c.arch} {c.kernel} {c.config}: {c.problem}" for c in compiled if c.problem]
    print(f"{len(compiled)} kernels compiled for {len(jobs)} GPU generations; {len(problems)} problems")
    for problem in problems:
        print("PROBLEM", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

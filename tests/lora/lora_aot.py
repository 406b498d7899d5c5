"""Compile the mixture kernels for CUDA targets without a GPU (run as a script, outside the interpreter).

Usage: python lora_aot.py ARCH... ; prints one line per (arch, dtype) and exits non-zero on a compile error.
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.lora_mixture as lm
import kernels.lora_sgmv as sg

COMMON = {"L": "i32", "R": "i32", "K": "i32"}


def compile_all(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    for dt in ("bf16", "fp16", "fp32"):
        precision = "ieee" if dt == "fp32" else "tf32"
        shrink = {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "slot_ptr": "*i32", "w_ptr": "*fp32", "v_ptr": "*fp32",
                  **COMMON, "IN": "i32", "stride_xt": "i32", "stride_as": "i32", "stride_ar": "i32",
                  "stride_ai": "i32", "SPLIT_LEN": "i32"}
        expand = {"v_ptr": "*fp32", "b_ptr": f"*{dt}", "slot_ptr": "*i32", "y_ptr": f"*{dt}", **COMMON,
                  "OUT": "i32", "stride_yt": "i32", "stride_bs": "i32", "stride_bo": "i32", "stride_br": "i32"}
        for fn, sig, blocks in ((lm._shrink_kernel, shrink, {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 64,
                                                             "SPLIT_K": 4}),
                                (lm._expand_kernel, expand, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 16})):
            consts = {**blocks, "PRECISION": precision, "DOT_FP32": False}
            sig = {**sig, **{name: "constexpr" for name in consts}}
            compiled = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target)
            print(f"sm_{arch} {dt} {fn.__name__}: {len(compiled.asm['ptx'])} bytes of PTX")
        compile_sgmv(target, arch, dt, precision)


def compile_sgmv(target, arch: int, dt: str, precision: str) -> None:
    """The packed kernel: its shrink, and its expand both for K = 1 (in place on y) and K > 1 (fp32 atomics)."""
    common = {"pair_ptr": "*i32", "tile_slot_ptr": "*i32", "R": "i32", "K": "i32"}
    shrink = {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", **common, "w_ptr": "*fp32", "v_ptr": "*fp32", "IN": "i32",
              "stride_xt": "i32", "stride_as": "i32", "stride_ar": "i32", "stride_ai": "i32"}
    launches = [(sg._sgmv_shrink_kernel, shrink, {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 64})]
    for atomic in (False, True):
        expand = {"v_ptr": "*fp32", "b_ptr": f"*{dt}", **common, "y_ptr": "*fp32" if atomic else f"*{dt}",
                  "OUT": "i32", "stride_yt": "i32", "stride_bs": "i32", "stride_bo": "i32", "stride_br": "i32"}
        launches.append((sg._sgmv_expand_kernel, expand, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 16,
                                                          "ATOMIC": atomic}))
    for fn, sig, blocks in launches:
        consts = {**blocks, "PRECISION": precision, "DOT_FP32": False}
        sig = {**sig, **{name: "constexpr" for name in consts}}
        # keep the kernel's parameter order
        sig = {name: sig[name] for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target)
        print(f"sm_{arch} {dt} {fn.__name__}: {len(compiled.asm['ptx'])} bytes of PTX")


if __name__ == "__main__":
    for arch in sys.argv[1:]:
        compile_all(int(arch))

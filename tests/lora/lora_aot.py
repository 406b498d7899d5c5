"""Compile the mixture kernels for CUDA targets without a GPU (run as a script, outside the interpreter).

Usage: python lora_aot.py ARCH... ; prints one line per (arch, dtype) and exits non-zero on a compile error.
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.lora_mixture as lm

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


if __name__ == "__main__":
    for arch in sys.argv[1:]:
        compile_all(int(arch))

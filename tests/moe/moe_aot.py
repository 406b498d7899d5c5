"""Compile the MoE kernels for CUDA targets without a GPU (run as a script, outside the interpreter), for every
configuration of the Hopper table and each dtype, so a kernel that only the interpreter accepts fails here.

Usage: python moe_aot.py ARCH... ; prints one line per compiled kernel and exits non-zero on a compile error.
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.combine as combine
import kernels.expert_gemm as gemm
import kernels.moe_align as align
from kernels.moe_configs import _CUDA_TABLE, _FP32_TABLE, _SM90_TABLE

SHARED_MEMORY_LIMIT = 232448  # bytes per block on H100/H200 (227 KiB)
STRIDES = ("stride_am", "stride_ak", "stride_we", "stride_wn", "stride_wk", "stride_be", "stride_om", "stride_on")


def compile_one(fn, signature: dict, constexprs: dict, target, options: dict) -> int:
    """PTX size of the compiled kernel; fails if it would need more shared memory than Hopper has, which a
    launch would report only on the GPU ("out of resources")."""
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=target, options=options)
    shared = compiled.metadata.shared
    if shared > SHARED_MEMORY_LIMIT:
        raise SystemExit(f"{fn.__name__} {constexprs} {options}: needs {shared} bytes of shared memory, "
                         f"over Hopper's {SHARED_MEMORY_LIMIT}")
    return len(compiled.asm["ptx"])


def compile_all(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    ids = {"sorted_pair_ids_ptr": "*i32", "block_expert_ids_ptr": "*i32", "num_padded_ptr": "*i64"}
    chunk = 1024
    size = compile_one(align._count_pairs_kernel, {"expert_ids_ptr": "*i32", "counts_ptr": "*i32",
                                                   "num_pairs": "i32"}, {"CHUNK": chunk}, target, {})
    print(f"sm_{arch} align count: {size} bytes of PTX")
    size = compile_one(align._scatter_pairs_kernel, {"expert_ids_ptr": "*i32", "padded_start_ptr": "*i64",
                                                         "padded_count_ptr": "*i32", "sorted_pair_ids_ptr": "*i32",
                                                         "block_expert_ids_ptr": "*i32", "num_pairs": "i32"},
                       {"BLOCK_M": 64, "CHUNK": chunk}, target, {})
    print(f"sm_{arch} align scatter: {size} bytes of PTX")
    for dt, table in (("bf16", _SM90_TABLE), ("bf16", _CUDA_TABLE), ("fp32", _FP32_TABLE)):
        precision = "ieee" if dt == "fp32" else "tf32"
        for _, config in table:
            blocks = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
            options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
            up = {"x_ptr": f"*{dt}", "w1_ptr": f"*{dt}", "w3_ptr": f"*{dt}", "b1_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                  **ids, "num_pairs": "i32", "top_k": "i32", "N": "i32", "K": "i32",
                  **{s.replace("_a", "_x"): "i32" for s in STRIDES}}
            for gated, bias in ((True, False), (False, True)):
                size = compile_one(gemm._expert_up_kernel, up,
                                   {**blocks, "GATED": gated, "HAS_BIAS": bias, "ACTIVATION": 3 if gated else 1,
                                    "PRECISION": precision, "UPCAST": False}, target, options)
                print(f"sm_{arch} {dt} up {blocks} gated={gated}: {size} bytes of PTX")
            down = {"a_ptr": f"*{dt}", "w2_ptr": f"*{dt}", "b2_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                    "pair_weights_ptr": "*fp32", **ids, "num_pairs": "i32", "N": "i32", "K": "i32",
                    **{s: "i32" for s in STRIDES}}
            size = compile_one(gemm._expert_down_kernel, down, {**blocks, "HAS_BIAS": True, "WEIGHTED": True,
                                                                "PRECISION": precision, "UPCAST": False},
                               target, options)
            print(f"sm_{arch} {dt} down {blocks}: {size} bytes of PTX")
        size = compile_one(combine._combine_topk_kernel,
                           {"pair_out_ptr": f"*{dt}", "expert_ids_ptr": "*i64", "out_ptr": f"*{dt}",
                            "num_tokens": "i32", "N": "i32", "num_experts": "i32", "stride_pm": "i32",
                            "stride_pn": "i32", "stride_om": "i32", "stride_on": "i32"},
                           {"TOP_K": 2, "BLOCK_T": 16, "BLOCK_N": 256}, target, {})
        print(f"sm_{arch} {dt} combine: {size} bytes of PTX")


if __name__ == "__main__":
    for arch in sys.argv[1:]:
        compile_all(int(arch))

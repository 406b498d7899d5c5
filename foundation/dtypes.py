"""The one dtype table: safetensors codes and the names users write, mapped to torch dtypes."""
from __future__ import annotations

import torch

# Every dtype safetensors writes that torch can hold. F4 packs two values per byte; torch keeps them as
# `float4_e2m1fn_x2`, whose last dimension is half the header's.
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
    "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu, "F4": torch.float4_e2m1fn_x2,
}
# Bits per element as a safetensors header counts elements (BOOL is one byte per element).
_HEADER_BITS = {"F4": 4}

# The names a registry entry, a merge config or a keyword argument may use.
NAMED_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64,
}


def parse_dtype(dtype) -> torch.dtype:
    """A torch dtype from a torch dtype or one of `NAMED_DTYPES`' names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in NAMED_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(NAMED_DTYPES)}")
    return NAMED_DTYPES[dtype]


def header_bits(code: str) -> int:
    """Bits per element of a safetensors dtype code, as its header's shapes count elements."""
    return _HEADER_BITS.get(code, SAFETENSORS_DTYPES[code].itemsize * 8)

"""The Triton kernels compile for Hopper (H100/H200) even on a machine without a GPU: the interpreter that runs
the other tests compiles nothing. Each script compiles its kernels for sm_90 and checks what a launch would."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import triton_importable

TESTS = Path(__file__).resolve().parent


@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the CUDA parity tests compile and run the kernels")
@pytest.mark.parametrize("script,kernels", [("lora/lora_aot.py", 15), ("moe/moe_aot.py", 41)])
def test_kernels_compile_for_sm90(tmp_path, script, kernels):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(TESTS.parent), TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, str(TESTS / script), "90"], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("this Triton build ships no ptxas")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.count("bytes of PTX") == kernels

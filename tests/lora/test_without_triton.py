"""Without Triton, engine.lora imports and the mixture falls back to the PyTorch reference."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch
import engine.lora
from tessera_kernels import triton_importable
from tessera_kernels.lora_mixture import lora_mixture, lora_mixture_reference
assert not triton_importable()
x, y = torch.randn(4, 16), torch.randn(4, 8)
a, b = torch.randn(2, 4, 16), torch.randn(2, 8, 4)
slots, w = torch.tensor([[0, 1], [1, -1]], dtype=torch.int32), torch.rand(2, 2)
assert torch.equal(lora_mixture(x, y.clone(), a, b, slots, w), lora_mixture_reference(x, y.clone(), a, b, slots, w))
try:
    lora_mixture(x, y, a, b, slots, w, backend="triton")
except RuntimeError as exc:
    print("refused:", exc)
"""


def test_import_and_fallback_without_triton():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: Triton cannot run" in result.stdout

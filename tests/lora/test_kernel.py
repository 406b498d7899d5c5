"""The Triton mixture kernel against its PyTorch reference, and the reference against a per-row loop."""
import pytest
import torch

from tessera_kernels import triton_available
from tessera_kernels.lora_mixture import lora_mixture, lora_mixture_reference, lora_mixture_triton

# Kernel tests run on the GPU where there is one, else on CPU tensors through Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(DEVICE), reason="Triton cannot run here")


def _case(rows, per_row, d_in, d_out, rank, n_slots, k, dtype, device=DEVICE):
    x = torch.randn(rows * per_row, d_in).to(dtype).to(device)
    y = torch.randn(rows * per_row, d_out).to(dtype).to(device)
    a = (torch.randn(n_slots, rank, d_in) / d_in ** 0.5).to(dtype).to(device)
    b = torch.randn(n_slots, d_out, rank).to(dtype).to(device)
    slots = torch.randint(-1, n_slots, (rows, k), dtype=torch.int32, device=device)
    slots[0] = -1  # one row on the base model
    weights = torch.rand(rows, k, device=device)
    return x, y, a, b, slots, weights


def _loop(x, y, a, b, slots, weights):
    rows, k = slots.shape
    per_row = x.shape[0] // rows
    out = y.float().clone()
    for r in range(rows):
        for j in range(k):
            s = int(slots[r, j])
            if s >= 0:
                xs = x[r * per_row:(r + 1) * per_row].float()
                out[r * per_row:(r + 1) * per_row] += weights[r, j] * (xs @ a[s].float().T) @ b[s].float().T
    return out


def test_reference_matches_per_row_loop():
    x, y, a, b, slots, weights = _case(4, 3, 24, 20, 5, 6, 3, torch.float32)
    out = lora_mixture_reference(x, y.clone(), a, b, slots, weights)
    torch.testing.assert_close(out, _loop(x, y, a, b, slots, weights), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("rows,per_row,d_in,d_out,rank,k", [(3, 5, 40, 24, 4, 3), (2, 17, 16, 70, 8, 1),
                                                            (5, 1, 32, 32, 16, 2)])
def test_triton_matches_reference(dtype, tol, rows, per_row, d_in, d_out, rank, k):
    x, y, a, b, slots, weights = _case(rows, per_row, d_in, d_out, rank, 4, k, dtype)
    expected = lora_mixture_reference(x, y.clone(), a, b, slots, weights)
    got = lora_mixture_triton(x, y.clone(), a, b, slots, weights)
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item())


@needs_triton
@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_shrink_matches_reference(split_k):
    x, y, a, b, slots, weights = _case(3, 2, 80, 24, 4, 4, 2, torch.float32)
    expected = lora_mixture_reference(x, y.clone(), a, b, slots, weights)
    got = lora_mixture_triton(x, y.clone(), a, b, slots, weights, split_k=split_k)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_triton
def test_empty_rows_leave_base_output_untouched():
    x, y, a, b, slots, weights = _case(3, 4, 16, 16, 4, 2, 2, torch.float32)
    slots.fill_(-1)
    assert torch.equal(lora_mixture(x, y.clone(), a, b, slots, weights, backend="triton"), y)


def test_bad_inputs_name_the_problem():
    x, y, a, b, slots, weights = _case(2, 3, 16, 16, 4, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="features"):
        lora_mixture_reference(x[:, :8], y, a, b, slots, weights)
    with pytest.raises(ValueError, match="split evenly"):
        lora_mixture_reference(x[:5], y[:5], a, b, slots, weights)
    with pytest.raises(ValueError, match="out of range"):
        lora_mixture_reference(x, y, a, b, slots + 5, weights)
    with pytest.raises(ValueError, match="dtype"):
        lora_mixture_reference(x.double(), y.double(), a, b, slots, weights)
    with pytest.raises(ValueError, match="backend"):
        lora_mixture(x, y, a, b, slots, weights, backend="cuda")

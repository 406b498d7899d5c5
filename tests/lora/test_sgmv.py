"""The packed, segment-grouped mixture kernel (lora_sgmv) against its PyTorch reference, the reference against a
per-token loop, padded rows as a special case (equal to the row kernel), and the device-side grouping."""
import pytest
import torch

from tessera_kernels import triton_available
from tessera_kernels.lora_mixture import lora_mixture_reference
from tessera_kernels.lora_sgmv import group_pairs, lora_sgmv, lora_sgmv_reference, lora_sgmv_triton, row_token_slots

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(DEVICE), reason="Triton cannot run here")


def _case(tokens, d_in, d_out, rank, n_slots, k, dtype, device=DEVICE):
    x = torch.randn(tokens, d_in).to(dtype).to(device)
    y = torch.randn(tokens, d_out).to(dtype).to(device)
    a = (torch.randn(n_slots, rank, d_in) / d_in ** 0.5).to(dtype).to(device)
    b = torch.randn(n_slots, d_out, rank).to(dtype).to(device)
    slots = torch.randint(-1, n_slots, (tokens, k), dtype=torch.int32, device=device)
    weights = torch.rand(tokens, k, device=device)
    return x, y, a, b, slots, weights


def test_reference_matches_per_token_loop():
    x, y, a, b, slots, weights = _case(11, 24, 20, 5, 4, 3, torch.float32, "cpu")
    expected = y.clone()
    for t in range(11):
        for j in range(3):
            s = int(slots[t, j])
            if s >= 0:
                expected[t] += weights[t, j] * (b[s] @ (a[s] @ x[t]))
    torch.testing.assert_close(lora_sgmv_reference(x, y.clone(), a, b, slots, weights), expected,
                               rtol=1e-5, atol=1e-5)


def test_grouping_puts_each_slot_in_whole_tiles():
    slots = torch.tensor([[2, -1], [0, 2], [2, 2], [-1, -1], [0, 1]], dtype=torch.int32)
    pair_ids, tile_slot = group_pairs(slots, n_slots=3, block_m=2)
    tiles = pair_ids.view(-1, 2)
    got = {}
    for tile, slot in zip(tiles.tolist(), tile_slot.tolist()):
        if slot >= 0:
            got.setdefault(slot, []).extend(p for p in tile if p >= 0)
        else:
            assert tile == [-1, -1]
    flat = slots.reshape(-1).tolist()
    assert {s: sorted(p) for s, p in got.items()} == {s: [p for p, v in enumerate(flat) if v == s] for s in range(3)}
    assert tile_slot.tolist().count(2) == 2  # four pairs of slot 2: two tiles, one read of its A and B each


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("tokens,d_in,d_out,rank,k", [(37, 40, 24, 8, 1), (5, 16, 70, 16, 3), (1, 32, 32, 4, 2)])
def test_triton_matches_reference(dtype, tol, tokens, d_in, d_out, rank, k):
    x, y, a, b, slots, weights = _case(tokens, d_in, d_out, rank, 5, k, dtype)
    expected = lora_sgmv_reference(x, y.clone(), a, b, slots, weights)
    got = lora_sgmv_triton(x, y.clone(), a, b, slots, weights)
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_varlen_rows_and_padded_rows(backend):
    """Packed rows of lengths 3, 1, 5 with per-row adapters; and equal rows, which must match the row kernel."""
    x, y, a, b, _, _ = _case(9, 32, 24, 4, 3, 2, torch.float32)
    row_slots = torch.tensor([[0, 2], [-1, -1], [1, 0]], dtype=torch.int32, device=DEVICE)
    row_weights = torch.tensor([[0.7, 0.3], [0.0, 0.0], [1.0, -0.5]], device=DEVICE)
    lens = torch.tensor([3, 1, 5])
    slots, weights = row_token_slots(row_slots, row_weights, lens)
    got = lora_sgmv(x, y.clone(), a, b, slots, weights, backend=backend)
    expected = y.clone()
    for row, (start, stop) in enumerate([(0, 3), (3, 4), (4, 9)]):
        lora_mixture_reference(x[start:stop], expected[start:stop], a, b, row_slots[row:row + 1],
                               row_weights[row:row + 1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[3], y[3])  # the row on the base model is untouched
    padded_x, padded_y = x[:8], y[:8]
    rows4 = torch.tensor([[0, -1], [2, 1], [-1, -1], [1, 1]], dtype=torch.int32, device=DEVICE)
    w4 = torch.rand(4, 2, device=DEVICE)
    slots, weights = row_token_slots(rows4, w4, 2)
    torch.testing.assert_close(lora_sgmv(padded_x, padded_y.clone(), a, b, slots, weights, backend=backend),
                               lora_mixture_reference(padded_x, padded_y.clone(), a, b, rows4, w4),
                               rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_problem():
    x, y, a, b, slots, weights = _case(4, 16, 16, 4, 2, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="x has 8 features but the adapters expect 16"):
        lora_sgmv_reference(x[:, :8], y, a, b, slots, weights)
    with pytest.raises(ValueError, match="token_slots"):
        lora_sgmv_reference(x, y, a, b, slots[:3], weights[:3])
    with pytest.raises(ValueError, match="out of range"):
        lora_sgmv_reference(x, y, a, b, slots + 5, weights)
    with pytest.raises(ValueError, match="backend"):
        lora_sgmv(x, y, a, b, slots, weights, backend="cuda")

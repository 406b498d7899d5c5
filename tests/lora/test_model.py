"""attach_adapters on tiny Llama and Mixtral: every row of a mixed batch equals PEFT's merged adapter for
that row's weights (add_weighted_adapter, combination_type="cat")."""
import copy

import pytest
import torch

from engine.lora import AdapterPool, RoutingError, attach_adapters, peft_weighted_model
from tessera_kernels import triton_available

from lora_helpers import save_adapter, tiny_mixtral

MIXES = [{"alpha": 0.6, "beta": 0.3, "gamma": 0.1}, {}, {"delta": 1.0}, {"beta": 0.5, "gamma": 0.5}]


def _peft_row(model, pool, mix, ids):
    if not mix:
        return model(input_ids=ids).logits
    oracle = peft_weighted_model(copy.deepcopy(model), pool, mix, combination_type="cat")
    with torch.no_grad():
        return oracle(input_ids=ids).logits


@pytest.mark.parametrize("backend,device", [
    ("torch", "cpu"),
    pytest.param("triton", "cpu", marks=pytest.mark.skipif(not triton_available("cpu"), reason="no interpreter")),
    pytest.param("triton", "cuda", marks=pytest.mark.cuda),
])
def test_mixed_batch_matches_peft_per_row(llama, adapter_dirs, backend, device):
    pool = AdapterPool(adapter_dirs, base_model="tessera/tiny-llama")
    model = copy.deepcopy(llama).to(device)
    ids = torch.randint(3, 96, (len(MIXES), 7), device=device)
    lm = attach_adapters(copy.deepcopy(model), pool, backend=backend)
    got = lm(input_ids=ids, adapter_weights=MIXES).logits
    for row, mix in enumerate(MIXES):
        expected = _peft_row(model, pool, mix, ids[row:row + 1])
        torch.testing.assert_close(got[row:row + 1], expected, rtol=1e-4, atol=1e-4)


def test_no_weights_is_the_base_model(llama, adapter_dirs):
    ids = torch.randint(3, 96, (2, 5))
    lm = attach_adapters(copy.deepcopy(llama), adapter_dirs)
    with torch.no_grad():
        base = llama(input_ids=ids).logits
    torch.testing.assert_close(lm(input_ids=ids).logits, base)
    torch.testing.assert_close(lm(input_ids=ids, adapter_weights=[{}, {}]).logits, base)


def test_generate_routes_rows_and_repeats_them_for_return_sequences(llama, adapter_dirs):
    pool = AdapterPool(adapter_dirs)
    ids = torch.randint(3, 96, (2, 4))
    lm = attach_adapters(copy.deepcopy(llama), pool)
    mixes = [{"alpha": 1.0}, {"beta": 0.5, "delta": 0.5}]
    out = lm.generate(input_ids=ids, adapter_weights=mixes, max_new_tokens=3, do_sample=False,
                      num_return_sequences=2, num_beams=2)
    assert out.shape == (4, 7)
    for row, mix in enumerate(mixes):
        oracle = peft_weighted_model(copy.deepcopy(llama), pool, mix)
        with torch.no_grad():
            expected = oracle.generate(input_ids=ids[row:row + 1], max_new_tokens=3, do_sample=False,
                                       num_return_sequences=2, num_beams=2)
        assert torch.equal(out[2 * row:2 * row + 2], expected)


def test_mixtral_attention_lora_matches_peft(tmp_path):
    model = tiny_mixtral()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    dirs = {n: save_adapter(model, tmp_path / n, seed=10 + i, targets=targets) for i, n in enumerate("ab")}
    pool = AdapterPool(dirs)
    ids = torch.randint(3, 96, (2, 6))
    mixes = [{"a": 0.7, "b": 0.3}, {"b": 1.0}]
    got = attach_adapters(copy.deepcopy(model), pool, backend="auto")(input_ids=ids, adapter_weights=mixes)
    for row, mix in enumerate(mixes):
        torch.testing.assert_close(got.logits[row:row + 1], _peft_row(model, pool, mix, ids[row:row + 1]),
                                   rtol=1e-4, atol=1e-4)


def test_bad_requests_are_rejected(llama, adapter_dirs):
    lm = attach_adapters(copy.deepcopy(llama), adapter_dirs)
    ids = torch.randint(3, 96, (2, 4))
    with pytest.raises(RoutingError, match="2 rows"):
        lm(input_ids=ids, adapter_weights=[{}])
    with pytest.raises(RoutingError, match="unknown adapter 'nope'"):
        lm(input_ids=ids, adapter_weights=[{"nope": 1.0}, {}])
    with pytest.raises(RoutingError, match="needs a router"):
        lm(input_ids=ids, route="auto", queries=["a", "b"])
    with pytest.raises(Exception, match="already has adapters"):
        attach_adapters(lm.model, adapter_dirs)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available("cpu"), reason="no interpreter"))])
def test_packed_rows_match_rows_run_alone(llama, adapter_dirs, backend):
    """A packed [1, T] batch (rows of 3, 1 and 5 tokens, seq_lens=) runs the segment-grouped kernel; the first
    layer's projections (token-local inputs) equal each row run alone."""
    lm = attach_adapters(copy.deepcopy(llama), AdapterPool(adapter_dirs), backend=backend)
    lens, mixes = [3, 1, 5], [{"alpha": 0.6, "gamma": 0.4}, {}, {"delta": 1.0}]
    ids = torch.randint(3, 96, (1, sum(lens)))
    seen = []
    layer = lm.model.model.layers[0].self_attn.v_proj
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    try:
        lm(input_ids=ids, adapter_weights=mixes, seq_lens=lens)
        for (start, stop), mix in zip([(0, 3), (3, 4), (4, 9)], mixes):
            lm(input_ids=ids[:, start:stop], adapter_weights=[mix])
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], torch.cat(seen[1:], dim=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(RoutingError, match="seq_lens must be row lengths"):
        lm(input_ids=ids, adapter_weights=mixes, seq_lens=[3, 1, 4])

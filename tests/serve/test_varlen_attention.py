"""Per-request attention over a packed continuous-batching step equals attention over the whole step with the
dense block-diagonal causal mask transformers builds for SDPA, and RankBatch switches a model to it and back."""
import torch
import torch.nn.functional as F

import engine
from engine.serving.paged_batch import RankBatch
from engine.serving.varlen_attention import NAME, varlen_attention


class Module:
    num_key_value_groups = 2


def test_decodes_first_chunks_and_later_chunks_match_the_dense_mask():
    torch.manual_seed(0)
    # (query tokens, keys) per request: decodes, a first prefill chunk (all keys new), a later chunk, a decode
    shapes = [(1, 9), (1, 40), (7, 7), (5, 23), (1, 1), (3, 3)]
    heads, kv_heads, dim = 4, 2, 8
    total_q, total_k = sum(q for q, _ in shapes), sum(k for _, k in shapes)
    # laid out token-major underneath, as the projections and the cache read make them
    query = torch.randn(1, total_q, heads, dim).transpose(1, 2)
    key = torch.randn(1, total_k, kv_heads, dim).transpose(1, 2)
    value = torch.randn(1, total_k, kv_heads, dim).transpose(1, 2)
    cu_q = torch.tensor([0] + [sum(q for q, _ in shapes[: i + 1]) for i in range(len(shapes))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(k for _, k in shapes[: i + 1]) for i in range(len(shapes))], dtype=torch.int32)

    mask = torch.zeros(total_q, total_k, dtype=torch.bool)  # written from the definition, request by request
    for i, (q, k) in enumerate(shapes):
        for j in range(q):  # query j sits at position k - q + j of its request and sees positions 0 .. k - q + j
            mask[cu_q[i] + j, cu_k[i]: cu_k[i] + k - q + j + 1] = True
    want = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3, enable_gqa=True)

    got, weights = varlen_attention(Module(), query, key, value, None, scaling=0.3, cu_seq_lens_q=cu_q,
                                    cu_seq_lens_k=cu_k)
    assert weights is None
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_rank_batch_switches_the_model_and_close_gives_it_back():
    model = engine.load("tiny-mixtral", device="cpu")
    before = model.config._attn_implementation
    batch = RankBatch(model, num_blocks=8, block_size=16)
    assert model.config._attn_implementation == NAME
    assert batch.processor.inputs_and_outputs.attention_mask is None  # no dense mask is built per step
    batch.close()
    assert model.config._attn_implementation == before

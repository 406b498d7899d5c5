"""Per-request attention over a packed continuous-batching step equals attention over the whole step with the
dense block-diagonal causal mask transformers builds for SDPA, whether the keys come read back token by token or
straight from the cache's pages, and RankBatch switches a model to it and back."""
import torch
import torch.nn.functional as F

import engine
from engine.serving.paged_batch import RankBatch
from engine.serving.varlen_attention import DECODE_GROUP, NAME, PAGES, Pages, StepPlan, varlen_attention


class Module:
    num_key_value_groups = 2


def packed_step(shapes, heads=4, kv_heads=2, dim=8):
    """query/key/value of a packed step with (query tokens, keys) per request, laid out token-major underneath as
    the projections and the cache read make them, and the attention over the whole step with the dense mask,
    written from the definition request by request."""
    total_q, total_k = sum(q for q, _ in shapes), sum(k for _, k in shapes)
    query = torch.randn(1, total_q, heads, dim).transpose(1, 2)
    key = torch.randn(1, total_k, kv_heads, dim).transpose(1, 2)
    value = torch.randn(1, total_k, kv_heads, dim).transpose(1, 2)
    cu_q = torch.tensor([0] + [sum(q for q, _ in shapes[: i + 1]) for i in range(len(shapes))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(k for _, k in shapes[: i + 1]) for i in range(len(shapes))], dtype=torch.int32)
    mask = torch.zeros(total_q, total_k, dtype=torch.bool)
    for i, (q, k) in enumerate(shapes):
        for j in range(q):  # query j sits at position k - q + j of its request and sees positions 0 .. k - q + j
            mask[cu_q[i] + j, cu_k[i]: cu_k[i] + k - q + j + 1] = True
    want = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3, enable_gqa=True)
    return query, key, value, cu_q, cu_k, want.transpose(1, 2)


# (query tokens, keys) per request: decodes, a first prefill chunk (all keys new), a later chunk, a decode
SHAPES = [(1, 9), (1, 40), (7, 7), (5, 23), (1, 1), (3, 3)]


def test_decodes_first_chunks_and_later_chunks_match_the_dense_mask():
    torch.manual_seed(0)
    query, key, value, cu_q, cu_k, want = packed_step(SHAPES)
    got, weights = varlen_attention(Module(), query, key, value, None, scaling=0.3, cu_seq_lens_q=cu_q,
                                    cu_seq_lens_k=cu_k)
    assert weights is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_keys_read_from_the_cache_pages_match_the_dense_mask():
    """The same step with every request's keys in pages of 4 tokens scattered over a page pool (as the paged
    cache holds them), more decoding requests than one group, and only this step's keys passed in. The lengths
    come with the pages as host lists: the boundaries transformers passes are on the meta device here, so reading
    them (a device synchronisation per layer on a GPU) would fail."""
    torch.manual_seed(1)
    shapes = SHAPES + [(1, n) for n in torch.randint(1, 30, (DECODE_GROUP + 5,)).tolist()]
    query, key, value, cu_q, cu_k, want = packed_step(shapes)
    size, kv_heads, dim = 4, key.shape[1], key.shape[3]
    k_pages, v_pages = torch.randn(200, size, kv_heads, dim), torch.randn(200, size, kv_heads, dim)
    free = torch.randperm(200).tolist()
    table = []
    for i, (_, n) in enumerate(shapes):  # request i's keys into pages taken from the pool in random order
        pages = [free.pop() for _ in range(-(-n // size))]
        keys = key[0, :, cu_k[i]: cu_k[i + 1]].transpose(0, 1)
        values = value[0, :, cu_k[i]: cu_k[i + 1]].transpose(0, 1)
        for j, page in enumerate(pages):
            k_pages[page, : len(keys[j * size: (j + 1) * size])] = keys[j * size: (j + 1) * size]
            v_pages[page, : len(values[j * size: (j + 1) * size])] = values[j * size: (j + 1) * size]
        table.append(pages)
    new = torch.cat([torch.arange(int(cu_k[i + 1]) - q, int(cu_k[i + 1])) for i, (q, _) in enumerate(shapes)])
    plan = StepPlan("cpu", [q for q, _ in shapes], [k for _, k in shapes], table, size)
    pages = Pages(k_pages, v_pages, plan)
    got, _ = varlen_attention(Module(), query, key[:, :, new], value[:, :, new], None, scaling=0.3,
                              cu_seq_lens_q=cu_q.to("meta"), cu_seq_lens_k=cu_k.to("meta"), **{PAGES: pages})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rank_batch_switches_the_model_and_close_gives_it_back():
    model = engine.load("tiny-mixtral", device="cpu")
    before = model.config._attn_implementation
    batch = RankBatch(model, num_blocks=8, block_size=16)
    assert model.config._attn_implementation == NAME
    assert batch.processor.inputs_and_outputs.attention_mask is None  # no dense mask is built per step
    assert batch.cache.update.__name__ == "update_then_pages"  # the keys come from the cache's pages
    batch.close()
    assert model.config._attn_implementation == before

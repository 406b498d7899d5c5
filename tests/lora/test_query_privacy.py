"""Query embeddings never reach the disk (only task validation sets are cached there), and the in-memory query
cache is a bounded LRU."""
import torch
from safetensors.torch import load_file

from engine import TaskRouter
from engine.lora import CachedEncoder


class CountingEncoder:
    """Deterministic 4-d embeddings from the text's characters; counts the texts it encodes."""

    name, dim = "test/counting", 4

    def __init__(self):
        self.seen: list[str] = []

    def encode(self, texts):
        self.seen.extend(texts)
        rows = [[sum(map(ord, t)) % 7 + 1.0, len(t) % 5 + 1.0, t.count("a") + 1.0, 1.0] for t in texts]
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_queries_are_never_written_to_disk(tmp_path):
    encoder = CachedEncoder(CountingEncoder(), tmp_path / "emb")
    tasks = {"math": ["what is 2+2", "solve x+1=3"], "food": ["bake a cake", "roast a chicken"]}
    router = TaskRouter.build(tasks, encoder=encoder, k=1, min_confidence=-1.0)
    on_disk = _files(tmp_path)
    assert on_disk  # the validation sets are cached
    stored = set()
    for shard in (tmp_path / "emb").rglob("*.safetensors"):
        stored |= set(load_file(str(shard)))
    assert stored == {encoder._key(t) for texts in tasks.values() for t in texts}
    router.route(["a private question about my bank account", "what is 3+3"])
    assert _files(tmp_path) == on_disk  # routing wrote nothing
    again = CachedEncoder(CountingEncoder(), tmp_path / "emb")
    again.encode(["a private question about my bank account"])
    assert again.encoder.seen == ["a private question about my bank account"]  # a new process has no trace of it


def test_query_cache_is_a_bounded_lru(tmp_path):
    inner = CountingEncoder()
    encoder = CachedEncoder(inner, tmp_path / "emb", max_entries=2)
    first = encoder.encode(["q1", "q2"])
    encoder.encode(["q1"])  # q1 becomes the most recent
    encoder.encode(["q3"])  # evicts q2, the least recently used
    assert len(encoder) == 2 and inner.seen == ["q1", "q2", "q3"]
    torch.testing.assert_close(encoder.encode(["q1"]), first[:1], rtol=0, atol=0)
    assert inner.seen == ["q1", "q2", "q3"]  # q1 was still cached
    encoder.encode(["q2"])
    assert inner.seen[-1] == "q2" and len(encoder) == 2  # q2 had been evicted: recomputed
    encoder.clear()
    assert len(encoder) == 0 and not list((tmp_path / "emb").rglob("*.safetensors"))

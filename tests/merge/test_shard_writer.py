"""The streaming shard writer writes exactly what `safetensors.save_file` writes for the same tensors."""
import torch
from safetensors.torch import save_file

from foundation.io import Checkpoint
from merge.io import ShardWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(3, 5, generator=g),
        "a.bias": torch.randn(7, generator=g).bfloat16(),
        "z::mask": torch.randint(0, 255, (4, 3), dtype=torch.uint8, generator=g),
        "mask": torch.rand(5, generator=g) > 0.5,
        "index": torch.arange(6).view(2, 3),
        "scale": torch.tensor(2.5),
        "half": torch.randn(2, 2, generator=g).half(),
        "empty": torch.zeros(0, 4),
    }


def test_one_shard_equals_save_file(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    (tmp_path / "out").mkdir()
    writer = ShardWriter(tmp_path / "out")
    for n, t in tensors.items():
        writer.add(n, t)
    assert writer.close() == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]  # no spill file left
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_shards_split_by_size_each_equal_save_file(tmp_path):
    tensors = _tensors()
    writer = ShardWriter(tmp_path, max_shard_bytes=64)
    shards, current, size = [], {}, 0
    for n, t in tensors.items():  # the split ShardWriter documents: a shard closes before the tensor that overflows it
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > 64:
            shards.append(current)
            current, size = {}, 0
        current[n], size = t, size + nbytes
        writer.add(n, t)
    shards.append(current)
    names = writer.close()
    assert len(names) == len(shards) > 1
    for name, expected in zip(names, shards):
        save_file(expected, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
        assert (tmp_path / name).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    (tmp_path / "ref.safetensors").unlink()
    loaded = Checkpoint(tmp_path).read(list(tensors))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())

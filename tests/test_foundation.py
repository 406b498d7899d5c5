"""The foundation layer: safetensors reading with checked headers, atomic folders, the dtype table, the cache."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from foundation.atomic import atomic_folder, remove_stale, write_json
from foundation.cache import build_once, cache_dir
from foundation.dtypes import SAFETENSORS_DTYPES, parse_dtype
from foundation.io import INDEX_NAME, Checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _sample(dtype: torch.dtype) -> torch.Tensor:
    """A small tensor of `dtype` with varied bits (bytes drawn at random, reinterpreted)."""
    raw = torch.randint(0, 256, (3, 8), dtype=torch.uint8)
    if dtype == torch.bool:
        return raw % 2 == 1
    return raw.view(dtype) if dtype.itemsize == 1 else raw.view(-1).view(dtype).reshape(3, -1)


@pytest.mark.parametrize("code", sorted(SAFETENSORS_DTYPES))
def test_every_safetensors_dtype_reads_back_bit_exact(tmp_path, code):
    tensor = _sample(SAFETENSORS_DTYPES[code])
    save_file({"t": tensor}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert ckpt.dtype["t"] == tensor.dtype
    assert ckpt.nbytes("t") == tensor.numel() * tensor.element_size()
    whole = ckpt.read(["t"])["t"]
    into = {"t": torch.empty_like(tensor)}
    ckpt.read_into(into)
    for got in (whole, into["t"], ckpt.read_part("t")):
        assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8))


def test_bool_tensors_are_one_byte_per_element(tmp_path):
    flags = torch.tensor([True, False, True, True, False])
    save_file({"mask": flags, "w": torch.ones(2, 3)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert ckpt.nbytes("mask") == 5
    assert torch.equal(ckpt.read(["mask"])["mask"], flags)
    assert torch.equal(ckpt.read_part("mask", ((1, 4),)), flags[1:4])


def test_parts_read_only_the_slice_and_are_logged(tmp_path):
    w = torch.arange(24, dtype=torch.float32).view(4, 6)
    save_file({"w": w}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.read_part("w", ((1, 3),)), w[1:3])
    assert torch.equal(ckpt.read_part("w", (None, (2, 5))), w[:, 2:5])
    assert [(r.index, r.nbytes) for r in ckpt.reads] == [(((1, 3),), 2 * 6 * 4), (((0, 4), (2, 5)), 4 * 3 * 4)]


def _sharded(folder: Path) -> None:
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, folder / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / INDEX_NAME).write_text(json.dumps(index))


def test_sharded_index_reads_each_tensor_from_its_file(tmp_path):
    _sharded(tmp_path / "m")
    ckpt = Checkpoint(tmp_path / "m")
    assert sorted(ckpt.names) == ["a", "b"]
    assert ckpt.file_of["b"].name == "model-00002-of-00002.safetensors"
    assert torch.equal(ckpt.read(["a", "b"])["b"], torch.zeros(3))


def test_index_naming_a_missing_file_names_tensor_and_file(tmp_path):
    _sharded(tmp_path / "m")
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['b'\] in model-00002-of-00002.safetensors, which is missing"):
        Checkpoint(tmp_path / "m")


def test_index_naming_a_tensor_its_file_lacks(tmp_path):
    _sharded(tmp_path / "m")
    index = json.loads((tmp_path / "m" / INDEX_NAME).read_text())
    index["weight_map"]["c"] = "model-00001-of-00002.safetensors"
    (tmp_path / "m" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="tensor c in model-00001-of-00002.safetensors, whose header lacks it"):
        Checkpoint(tmp_path / "m")


def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


@pytest.mark.parametrize("change, message", [
    (lambda h: h["w"].update(data_offsets=[0, 4096]), "truncated or corrupt: tensor w has data offsets"),
    (lambda h: h["w"].update(shape=[5, 6]), r"tensor w has 96 bytes, its shape \[5, 6\] and dtype F32 need 120"),
    (lambda h: h["w"].update(dtype="Q9"), "tensor w has dtype Q9"),
    (lambda h: h["w"].pop("shape"), "tensor w has a malformed header entry"),
])
def test_a_header_that_lies_names_tensor_and_file(tmp_path, change, message):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 6)}, path)
    _rewrite_header(path, change)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        Checkpoint(tmp_path)


def test_a_header_longer_than_its_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ValueError, match=f"{path}: corrupt safetensors header"):
        Checkpoint(tmp_path)


def test_dtype_names():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float13'"):
        parse_dtype("float13")


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "part").write_text("half")
            raise RuntimeError("failed midway")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with atomic_folder(out) as tmp:
        (tmp / "done").write_text("1")
    with pytest.raises(ValueError, match="already exists"):
        with atomic_folder(out):
            pass
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "again").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["again"]


def test_json_results_replace_the_old_file_whole(tmp_path):
    out = tmp_path / "results" / "bench.json"
    write_json(out, {"b": 1, "a": 2}, sort_keys=True)
    assert out.read_text() == '{\n "a": 2,\n "b": 1\n}\n'
    with pytest.raises(TypeError):
        write_json(out, {"not json": object()})
    assert json.loads(out.read_text()) == {"a": 2, "b": 1}
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_removes_the_temporary_folder(tmp_path, signum):
    script = textwrap.dedent(f"""
        import sys, time
        from foundation.atomic import atomic_folder
        with atomic_folder({str(tmp_path / 'out')!r}) as tmp:
            (tmp / "part").write_text("half")
            print("ready", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signum)
    assert proc.wait(timeout=30) != 0
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_killed_runs_are_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    (tmp_path / f".out.tmp-{dead.pid}-0badf00d").mkdir()  # killed while writing
    (tmp_path / f".out.tmp-{os.getpid()}-0000beef").mkdir()  # ours, still running: kept
    (tmp_path / "other").mkdir()
    assert [p.name for p in remove_stale(out)] == [f".out.tmp-{dead.pid}-0badf00d"]
    (tmp_path / f".out.old-{dead.pid}-12345678").mkdir()  # killed between moving out aside and renaming in
    remove_stale(out)
    assert out.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{os.getpid()}-0000beef", "other", "out"]


def test_cache_folder_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    assert cache_dir("models") == tmp_path / "cache" / "models"
    calls = []

    def write(tmp):
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")

    folder = cache_dir("models", "m")
    assert build_once(folder, write) == folder and build_once(folder, write) == folder
    assert len(calls) == 1 and (folder / "config.json").exists()
    with atomic_folder(folder, exist_ok=True) as tmp:  # a racing writer that finished second
        (tmp / "config.json").write_text('{"late": 1}')
    assert (folder / "config.json").read_text() == "{}"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["m"]

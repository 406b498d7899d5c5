"""The tokenizer a served model comes with, or bytes for tiny test models that have none."""
from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as token ids (ids at or past the vocabulary become '?'), for models built without a
    tokenizer (the tiny registry models). Honest and reversible for ASCII; enough to serve and test them."""

    pad_token_id = 0
    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b if b < self.vocab_size else ord("?") for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.pad_token_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        self.eos_token_id = self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(folder: Path | None, vocab_size: int):
    if folder is not None and any((Path(folder) / name).exists() for name in ("tokenizer.json", "vocab.txt",
                                                                               "tokenizer.model")):
        return HFTokenizer(Path(folder))
    return ByteTokenizer(vocab_size)

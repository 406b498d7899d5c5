"""The tokenizer a served model comes with, or bytes for tiny test models that have none; both turn a chat
(OpenAI messages) into prompt ids through a chat template: the tokenizer's own, or one the server is given."""
from __future__ import annotations

from pathlib import Path

try:
    from tokenizers.decoders import DecodeStream  # tokenizers >= 0.21
except ImportError:
    DecodeStream = None


class NoChatTemplate(ValueError):
    """The model's tokenizer has no chat template and the server was given none (`--chat-template`)."""


def render_chat(template: str, messages: list[dict], **variables) -> str:
    """A Jinja chat template rendered the way `transformers` renders one (sandboxed, trimmed blocks), for
    tokenizers that are not `transformers` tokenizers."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template).render(messages=messages, add_generation_prompt=True, **variables)


class ByteTokenizer:
    """UTF-8 bytes as token ids (ids at or past the vocabulary become '?'), for models built without a
    tokenizer (the tiny registry models). Honest and reversible for ASCII; enough to serve and test them."""

    pad_token_id = 0
    eos_token_id = None

    def __init__(self, vocab_size: int, chat_template: str | None = None):
        self.vocab_size, self.chat_template = vocab_size, chat_template

    def encode(self, text: str) -> list[int]:
        return [b if b < self.vocab_size else ord("?") for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")

    def decode_stream(self):
        return None  # TextStream decodes the last few bytes again per token

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if self.chat_template is None:
            raise NoChatTemplate("this model has no tokenizer, so no chat template: start the server with "
                                 "--chat-template FILE")
        return self.encode(render_chat(self.chat_template, messages))


class HFTokenizer:
    def __init__(self, folder: Path, chat_template: str | None = None):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.chat_template = chat_template or self._tok.chat_template
        self.pad_token_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        self.eos_token_id = self._tok.eos_token_id
        # Streaming decodes a few tokens for every token it sends. transformers' decode was about 12 % of the HTTP
        # event loop's samples on the decode benchmark at saturation, under half of that in the Rust call it wraps;
        # without its clean-up option (the only thing it adds to the text) that call gives the same text.
        backend = getattr(self._tok, "backend_tokenizer", None)
        self._decode_fast = None if backend is None or self._tok.clean_up_tokenization_spaces else backend.decode
        # Where the HTTP server runs inside rank 0 (embeddings, the static batcher), every prompt is encoded on
        # its event loop, which shares rank 0's GIL with the scheduler thread.
        # transformers' call holds the GIL through the Rust encode (16 % of the loop's samples on the decode
        # benchmark at 64 arrivals/s); the backend's encode_batch gives the same ids and releases the GIL while it
        # works, so the step goes on meanwhile. Used where it gives the same ids (checked once here; transformers'
        # call leaves the backend without truncation and padding, which that needs).
        self._encode_fast = None
        if backend is not None:
            probe = "Hello, world! 123 <s> héllo"
            fast = lambda text: backend.encode_batch([text], add_special_tokens=True)[0].ids  # noqa: E731
            if self._tok(probe, add_special_tokens=True)["input_ids"] == fast(probe) \
                    and backend.truncation is None and backend.padding is None:
                self._encode_fast = fast

    def encode(self, text: str) -> list[int]:
        if self._encode_fast is not None:
            return self._encode_fast(text)
        return self._tok(text, add_special_tokens=True)["input_ids"]

    def decode_stream(self):
        """A new incremental decoder, `step(token id) -> the text it adds, or None inside a character`, where it
        spells what `decode` spells: the Rust library's DecodeStream, about a quarter of TextStream's cost per token
        when it decodes a few tokens again for each (on byte-level BPE and WordPiece). None where `decode` is
        transformers' (its clean-up changes the text) or tokenizers has no DecodeStream."""
        if self._decode_fast is None or DecodeStream is None:
            return None
        stream, backend = DecodeStream(skip_special_tokens=True), self._tok.backend_tokenizer
        return lambda token_id: stream.step(backend, token_id)

    def decode(self, ids: list[int]) -> str:
        if self._decode_fast is not None:
            return self._decode_fast(ids, skip_special_tokens=True)
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if self.chat_template is None:
            raise NoChatTemplate("this model's tokenizer has no chat template: start the server with "
                                 "--chat-template FILE")
        text = self._tok.apply_chat_template(messages, chat_template=self.chat_template, add_generation_prompt=True,
                                             tokenize=False)
        return self._tok(text, add_special_tokens=False)["input_ids"]  # the template wrote the special tokens


def load_tokenizer(folder: Path | None, vocab_size: int, chat_template: str | None = None):
    """`chat_template`: a Jinja template, or the path of a file holding one, that replaces the tokenizer's own."""
    if chat_template is not None and "{" not in chat_template:  # a path: a template has Jinja tags
        chat_template = Path(chat_template).read_text()
    if folder is not None and any((Path(folder) / name).exists() for name in ("tokenizer.json", "vocab.txt",
                                                                               "tokenizer.model")):
        return HFTokenizer(Path(folder), chat_template)
    return ByteTokenizer(vocab_size, chat_template)

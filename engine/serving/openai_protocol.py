"""OpenAI's HTTP protocol as this server speaks it: the request bodies it accepts, the errors it answers, and the
shape of its answers, whole or streamed as server-sent events. No model or scheduler here: the app
(`engine.serving.app`) turns a request into prompt ids and sampling settings, the backend returns tokens, and
this module turns tokens into OpenAI's JSON.

Every body forbids fields it does not know, so a field the server cannot honour is a 400 that names it, never a
silent default.
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An answer other than 200, in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def __reduce__(self):  # pickled whole: rank 0's refusals reach an API server in a process of its own
        return APIError, (self.status, self.message, self.param, self.kind, self.headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingRequest(_Body):
    input: str | list[str] = Field(min_length=1)
    model: str | None = None
    encoding_format: Literal["float"] = "float"
    user: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The fields completions and chat completions share. `null` means the default, as OpenAI reads it."""

    model: str | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    adapter: str | None = None  # tessera's: an adapter of the server's pool, or "auto" (the task router decides)
    user: str | None = None  # accepted and ignored

    def stops(self) -> list[str]:
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]

    def check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only allowed with stream: true", "stream_options")


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)  # how many alternatives per token

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def asked_max_tokens(self) -> int | None:
        return self.max_tokens


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def for_template(self) -> dict:
        """The message as chat templates expect it: text content, and OpenAI's "developer" role as "system"."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: only allowed with logprobs: true", "top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise APIError(400, "max_tokens: give max_tokens or max_completion_tokens, not both", "max_tokens")

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens



class TextStream:
    """One choice's tokens, as they come, turned into text: cut before the first stop string, and with text held
    back while it could still turn into a stop string or is an incomplete UTF-8 character, so that nothing sent
    has to be taken back.

    `step`, where the tokenizer has one (`HFTokenizer.decode_stream`), is an incremental decoder: the text each
    token adds, or None while it ends inside a character. Without one, `decode` spells the last few tokens again
    for every token."""

    CONTEXT_TOKENS = 5  # decoded again before the new ones: a tokenizer that drops a leading space sees them

    def __init__(self, decode, stops: list[str], step=None):
        self.decode, self.stops, self.step = decode, stops, step
        self.tokens: list[int] = []
        self.offsets: list[int] = []  # where each token's text starts in `text`
        self.text, self.sent, self.stopped = "", 0, False
        self._decoded, self._clean, self._clean_chars = "", 0, 0  # all tokens' text; its last whole-character end
        self._inside_character = False  # with `step`: the last token ended inside a character

    def add(self, token: int) -> str:
        """Takes the next token; returns the text that can be sent now."""
        self.offsets.append(len(self.text))
        self.tokens.append(token)
        return self._cut(self._decode_step(token) if self.step is not None else self._decode_all())

    def _cut(self, text: str) -> str:
        self.text, hold = text, 1 if text.endswith("\ufffd") else 0
        if self.stops:
            # A stop string cannot start before `sent`: text is sent only once no stop string can begin in it.
            cut = min((i for i in (text.find(s, self.sent) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.stopped = text[:cut], True
                return self._release(cut)
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=hold)
        return self._release(len(text) - hold)

    def _decode_step(self, token: int) -> str:
        piece = self.step(token)
        self._inside_character = piece is None  # where decode() would end in U+FFFD
        self._decoded += piece or ""
        return self._decoded

    def _decode_all(self) -> str:
        """decode(tokens), decoding only the tokens since the text last ended on a whole character (and a few
        before them): decoding everything for every token made a long answer quadratic in its length."""
        start = max(self._clean - self.CONTEXT_TOKENS, 0)
        before, after = self.decode(self.tokens[start:self._clean]), self.decode(self.tokens[start:])
        if after.startswith(before):
            text = self._decoded[:self._clean_chars] + after[len(before):]
        else:  # the tokenizer re-spelled the context: decode it all
            text = self.decode(self.tokens)
        self._decoded = text
        if not text.endswith("\ufffd"):
            self._clean, self._clean_chars = len(self.tokens), len(text)
        return text

    def finish(self) -> str:
        """The text held back, now that no more tokens come."""
        ready = self._cut(self.decode(self.tokens)) if self._inside_character and not self.stopped else ""
        return ready + self._release(len(self.text))

    def _release(self, upto: int) -> str:
        delta = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta

    def text_tokens(self) -> int:
        """How many tokens made the answer's text: after a stop string, not those that only spelled the stop."""
        if not self.stopped:
            return len(self.tokens)
        return sum(1 for offset in self.offsets if offset < len(self.text))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class TextEvent:
    """`sse(chunk)` of a chunk whose only changing part is one string, rendered once around a marker, so that a
    streamed token's event costs one `json.dumps` of its text, not of the whole chunk."""

    MARK = "\0text\0"

    def __init__(self, make_chunk):
        """`make_chunk(text)` -> the chunk (a dict) that carries `text` after any other string that could hold the
        marker (a client's model name)."""
        self.head, _, self.tail = sse(make_chunk(self.MARK)).rpartition(json.dumps(self.MARK))

    def __call__(self, text: str) -> str:
        return self.head + json.dumps(text) + self.tail


class CompletionShape:
    """/v1/completions: `text` per choice; log-probabilities in the legacy columns (tokens, token_logprobs,
    top_logprobs, text_offset)."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, token_text):
        self.token_text = token_text

    def logprobs(self, entries, offsets) -> dict:
        return {"tokens": [self.token_text(t) for t, _, _ in entries],
                "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self.token_text(i): v for i, v in top} for _, _, top in entries],
                "text_offset": offsets}

    def choice(self, index, text, finish, logprobs) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, index, text, finish, logprobs, first=False) -> dict:
        return self.choice(index, text, finish, logprobs)


class ChatShape:
    """/v1/chat/completions: an assistant `message` per choice, streamed as `delta`s (the first names the role);
    log-probabilities as `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, token_text):
        self.token_text = token_text

    def _token(self, token_id, logprob) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def logprobs(self, entries, offsets) -> dict:
        return {"content": [{**self._token(t, lp), "top_logprobs": [self._token(i, v) for i, v in top]}
                            for t, lp, top in entries]}

    def choice(self, index, text, finish, logprobs) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    def delta(self, index, text, finish, logprobs, first=False) -> dict:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

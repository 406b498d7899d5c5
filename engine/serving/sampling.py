"""Per-row sampling settings a batch of rows can differ in: OpenAI's presence and frequency penalties, and the
log-probabilities a request asks back. Both are `transformers` logits processors, so `generate` (and any loop
that calls logits processors) applies them; `generate` runs custom processors before its temperature and top-p
warpers, which is where OpenAI applies penalties.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor


@dataclass
class Generation:
    """One row's result: the generated token ids (end-of-sequence dropped) and, if asked for, one log-probability
    entry per token: `(logprob of the token, [(token id, logprob), ...] of the most likely alternatives)`."""

    tokens: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


class PresenceFrequencyPenalty(LogitsProcessor):
    """Lowers each token's logit by `frequency * count + presence * (count > 0)`, where count is how often the row
    has generated that token so far. The prompt does not count (vLLM's reading of OpenAI's definition). Rows past
    the given lists (a rank's dummy row) are left alone."""

    def __init__(self, prompt_len: int, presence: list[float], frequency: list[float]):
        self.prompt_len = prompt_len
        self.presence = torch.tensor(presence, dtype=torch.float32)
        self.frequency = torch.tensor(frequency, dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = len(self.presence)
        generated = input_ids[:rows, self.prompt_len:]
        counts = torch.zeros((rows, scores.shape[1]), dtype=scores.dtype, device=scores.device)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        presence, frequency = self.presence.to(scores), self.frequency.to(scores)
        penalty = counts * frequency[:, None] + (counts > 0).to(scores) * presence[:, None]
        return torch.cat([scores[:rows] - penalty, scores[rows:]])


class LogprobRecorder(LogitsProcessor):
    """Keeps the latest step's log-softmax of the logits it is given; `take(tokens)` then turns it into each row's
    entry for the token that step chose. Placed first among the processors, it reports the model's own
    distribution, before penalties, temperature and top-p (as vLLM does by default).

    `tops[row]` is how many alternatives a row wants (0: only the chosen token's log-probability), or None for a
    row that wants none."""

    def __init__(self, tops: list[int | None]):
        self.tops = tops
        self.rows: list[list] = [[] for _ in tops]
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._last = torch.log_softmax(scores[: len(self.tops)].float(), dim=-1)
        return scores

    def take(self, tokens: list[int]) -> list:
        """Each row's entry for this step's chosen `tokens` (None for rows that want none); also kept in `rows`."""
        logprobs = self._last
        width = max((top or 0 for top in self.tops), default=0)
        top_values, top_ids = logprobs.topk(width, dim=-1) if width else (None, None)
        chosen = logprobs.gather(1, torch.tensor(tokens[: len(self.tops)], device=logprobs.device)[:, None])
        entries = []
        for row, top in enumerate(self.tops):
            entry = None
            if top is not None:
                alternatives = list(zip(top_ids[row, :top].tolist(), top_values[row, :top].tolist())) if top else []
                entry = (chosen[row, 0].item(), alternatives)
            self.rows[row].append(entry)
            entries.append(entry)
        return entries

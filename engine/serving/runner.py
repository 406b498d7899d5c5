"""What every rank does with its share of a batch: embed texts, generate continuations (the static batcher), or
run one step of its continuous batch (`self.batch`, an `engine.serving.paged_batch.RankBatch`).

Rank 0 decides the batches and sends each rank its rows (`engine.serving.coordinator`); every rank runs its rows
through the model, whose MoE layers exchange tokens with the other ranks according to the strategy. A rank with
no rows still runs one dummy row, so it joins every collective and nothing waits for it.
"""
from __future__ import annotations

import time

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from engine.moe.patch import routing_counts, track_routing
from engine.pooling import mean_pool_normalized
from engine.serving.lora_api import POOL_OPS, apply_pool_op
from engine.serving.sampling import Generation, LogprobRecorder, PresenceFrequencyPenalty


def model_kind(model) -> str:
    if not model.can_generate():
        return "encoder"
    return "seq2seq" if model.config.is_encoder_decoder else "decoder"


class RowLimits(StoppingCriteria):
    """Each row stops at its own token limit, or when its client has gone (`cancelled()` says which)."""

    def __init__(self, prompt_len: int, limits: list[int], cancelled=None):
        self.prompt_len, self.limits, self.cancelled = prompt_len, limits, cancelled

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids.shape[1] - self.prompt_len
        gone = self.cancelled() if self.cancelled else [False] * len(self.limits)
        done = [generated >= limit or stop for limit, stop in zip(self.limits, gone)]
        done += [True] * (input_ids.shape[0] - len(done))  # a rank's dummy row
        return torch.tensor(done, device=input_ids.device)


class StepStreamer(BaseStreamer):
    """Calls `on_step(tokens)` with each step's new token per row (the first `put` is the prompt: skipped)."""

    def __init__(self, on_step):
        self.on_step, self._started = on_step, False

    def put(self, value):
        if not self._started:
            self._started = True
            return
        self.on_step(value.reshape(-1).tolist())

    def end(self):
        pass


class Runner:
    def __init__(self, model, tokenizer, rank: int = 0, world: int = 1):
        self.model, self.tokenizer, self.rank, self.world = model, tokenizer, rank, world
        self.kind = model_kind(model)
        self.device = next(model.parameters()).device
        self.batch = None  # the continuous scheduler's RankBatch (engine.serving.paged_batch), when serving with it
        track_routing(model)

    def run(self, op: dict, streamer=None, cancelled=None) -> dict:
        start = time.perf_counter()
        rows = op["work"][self.rank] if op.get("work") else []
        if op["type"] == "embed":
            out = {"embeddings": self._embed(rows)}
        elif op["type"] == "generate":
            out = {"tokens": self._generate(rows, op, streamer, cancelled)}
        elif op["type"] == "step":
            out = self.batch.run(op, self.rank)
        elif op["type"] in POOL_OPS:
            out = apply_pool_op(self.model, op)
        elif op["type"] == "ping":
            out = {}
        else:
            raise ValueError(f"unknown operation {op['type']!r}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        out["seconds"] = time.perf_counter() - start
        if self.world > 1:  # rank 0's /metrics cannot reach this device: totals ride with the (synchronised) result
            out["routing"] = self.routing_counts()
        return out

    def eos_ids(self) -> set[int]:
        """The ids that end a row: the tokenizer's and the model's generation config's (which `generate` stops
        on; a model served with bytes for a tokenizer has only the latter)."""
        configured = self.model.generation_config.eos_token_id
        ids = set(configured if isinstance(configured, list) else [configured])
        ids.add(self.tokenizer.eos_token_id)
        return {i for i in ids if i is not None}

    def routing_counts(self) -> dict[str, list[int]]:
        return routing_counts(self.model)

    def _pad(self, rows: list[list[int]], left: bool):
        rows = rows or [[self.tokenizer.pad_token_id]]  # a rank without work runs a dummy row
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            mask[i, span] = 1
        return ids.to(self.device), mask.to(self.device)

    def _embed(self, rows):
        ids, mask = self._pad(rows, left=False)
        with torch.inference_mode():  # as RankBatch.run: nothing served is differentiated
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return mean_pool_normalized(hidden.float(), mask)[: len(rows)].cpu().tolist()

    def _generate(self, rows, op, streamer, cancelled):
        """Each row's `Generation`. Rows may differ in penalties and in the log-probabilities they want back
        (`op["penalties"]`, `op["logprobs"]`: per rank, per row); `streamer(tokens, logprob_entries)` sees every
        step of this rank's rows."""
        from engine.parallel import generate_lockstep

        params, limits = op["params"], op["limits"][self.rank]
        ids, mask = self._pad(rows, left=self.kind == "decoder")
        prompt_len = ids.shape[1] if self.kind == "decoder" else 1  # seq2seq: the decoder start token
        sampling = params["temperature"] > 0
        if sampling and params["seed"] is not None:  # no seed: this rank's generator goes on where it was
            torch.manual_seed(params["seed"] + self.rank)
        tops = op["logprobs"][self.rank] if "logprobs" in op else []
        recorder = LogprobRecorder(tops) if any(top is not None for top in tops) else None
        processors = LogitsProcessorList([recorder] if recorder else [])
        if "penalties" in op and op["penalties"][self.rank]:
            presence, frequency = zip(*op["penalties"][self.rank])
            processors.append(PresenceFrequencyPenalty(prompt_len, list(presence), list(frequency)))
        kwargs = dict(max_new_tokens=params["max_new_tokens"], do_sample=sampling,
                      pad_token_id=self.tokenizer.pad_token_id, logits_processor=processors,
                      stopping_criteria=StoppingCriteriaList([RowLimits(prompt_len, limits or [0], cancelled)]))
        if sampling:
            kwargs.update(temperature=params["temperature"], top_p=params["top_p"], top_k=0)
        eos = self.eos_ids()
        if streamer is not None or recorder is not None:
            ended = [False] * len(rows)

            def on_step(tokens):
                entries = recorder.take(tokens) if recorder else None
                if streamer is not None:
                    streamer(*_row_ends(tokens[: len(rows)], ended, eos), entries)
            kwargs["streamer"] = StepStreamer(on_step)
        if "adapters" in op:
            kwargs["adapter_weights"] = op["adapters"][self.rank] or [{}]  # a rank's dummy row: base model
        with torch.inference_mode():  # as RankBatch.run: nothing served is differentiated
            if self.world > 1:
                # Without rows, generate_lockstep runs its own dummy row: hand it the empty batch.
                out = generate_lockstep(self.model, ids[: len(rows)], mask[: len(rows)], **kwargs)
            else:
                out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        result = []
        for i, (row, limit) in enumerate(zip(out[:, prompt_len:].tolist(), limits)):
            row = row[:limit]
            end = next((j for j, token in enumerate(row) if token in eos), None)
            if end is not None:  # the end-of-sequence token, and the padding generate wrote after it
                row = row[:end]
            wanted = recorder is not None and tops[i] is not None
            result.append(Generation(row, recorder.rows[i][: len(row)] if wanted else None))
        return result


def _row_ends(tokens: list[int], ended: list[bool], eos: set[int]) -> tuple[list, list[bool]]:
    """One generate step's tokens for the streamer: a row that ended before this step gets None (generate pads
    it); `finished[i]` says row i ends at this step (its token is an end-of-sequence one, not text)."""
    step, finished = [], []
    for i, token in enumerate(tokens):
        step.append(None if ended[i] else token)
        finished.append(not ended[i] and token in eos)
        ended[i] = ended[i] or token in eos
    return step, finished

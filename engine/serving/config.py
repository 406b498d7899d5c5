"""Server settings: defaults, overridden by a YAML file (`--config configs/serve/X.yaml`), overridden by flags."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml


@dataclass
class ServeConfig:
    model: str = "minilm-moe"
    strategy: str = "auto"  # single | moeshard | ep | ep-capacity | auto (one rank: always single)
    backend: str | None = None
    dtype: str | None = None
    # LoRA adapters for completions: a saved TaskRouter folder (enables "adapter": "auto"), or a mapping
    # adapter name -> PEFT folder (requests then name their adapter).
    adapters: str | dict | None = None
    enable_lora: bool = False  # serve LoRA adapters loaded at run time (/v1/load_lora_adapter) without --adapters
    lora_budget_bytes: int | None = None  # device bytes per rank for adapter weights; unset: the whole pool
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_tokens: int = 8192  # prompt tokens in one batch, over all ranks
    max_batch_size: int = 64  # sequences in one batch (continuous scheduler: running requests per rank)
    # Generation: "continuous" (iteration-level batching on every rank, engine.serving.scheduler: over a paged KV
    # cache for decoders, engine.serving.encdec_batch for encoder-decoders) or "static" (one generate() call per
    # batch, engine.serving.batcher: the baseline). Embeddings and adapters on an encoder-decoder use the static
    # batcher.
    scheduler: str = "continuous"
    kv_cache_bytes: int | None = None  # KV budget per rank in bytes; unset: kv_cache_fraction of free memory
    kv_cache_fraction: float = 0.5
    kv_block_size: int = 32  # tokens per KV block
    # tokens per rank per step: longer prompts are prefilled in chunks of this size. On the decode benchmark (2 CPU
    # ranks, saturated) 512 streamed 6-9 % more tokens/s than 256, with a longer time per output token
    # (benchmarks/results/step_tokens_ab_cpu/)
    step_tokens: int = 512
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # requests waiting; past it, 503 with Retry-After
    max_input_tokens: int = 512  # per input text; past it, 413
    max_new_tokens: int = 256  # the largest `max_tokens` a completion may ask for
    heartbeat_s: float = 2.0  # idle ranks are pinged this often, so a dead rank is noticed
    rank_timeout_s: float = 60.0  # a collective that waits longer means a rank is gone
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    # When set, every /v1 endpoint needs `Authorization: Bearer <api_key>` (also from TESSERA_API_KEY).
    api_key: str | None = None
    chat_template: str | None = None  # a Jinja chat template (or its file) replacing the tokenizer's own
    max_model_len: int | None = None  # prompt + completion tokens; None: the model's max_position_embeddings

    def __post_init__(self):
        if self.scheduler not in ("continuous", "static"):
            raise ValueError(f"scheduler: {self.scheduler!r} is not 'continuous' or 'static'")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction: {self.kv_cache_fraction} is not in (0, 1]")

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> "ServeConfig":
        values = {}
        if path:
            data = yaml.safe_load(Path(path).read_text()) or {}
            unknown = set(data) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
            values.update(data)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

"""Tiny seeded models of every family, identical on every rank, and per-rank inputs of different sizes."""
from __future__ import annotations

import torch
import transformers

from engine.families import FAMILIES
from engine.families import patch_moe


def build(family_name: str, backend: str | None = "torch", seed: int = 0, **config_overrides):
    """A tiny model with random weights (routers included: Qwen's start at zero), patched with `backend`
    (None: left as Hugging Face built it, e.g. to save a standard checkpoint)."""
    family = FAMILIES[family_name]
    config = family.tiny_config(**config_overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, family.auto_class).from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gate.weight" in name or "router" in name or not param.abs().sum():
                param.normal_(0, 0.2)
    return model if backend is None else patch_moe(model, backend=backend)


def rank_inputs(family_name: str, rank: int, vocab: int = 90) -> dict:
    """Rank r gets 1 + r sequences of 4 + 2r tokens: every rank's token count differs."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(2, vocab, (1 + rank, 4 + 2 * rank), generator=g)
    if FAMILIES[family_name].auto_class == "AutoModelForSeq2SeqLM":
        return {"input_ids": ids, "decoder_input_ids": ids[:, : 2 + rank]}
    return {"input_ids": ids}


def forward(model, inputs: dict) -> torch.Tensor:
    """Logits, or the last hidden states of an encoder without a head."""
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state

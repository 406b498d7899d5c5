"""Generation in lockstep: every rank keeps calling the model until all ranks are done, so the collectives
inside each MoE layer always have every rank present, whatever each rank's prompts and stopping points."""
from __future__ import annotations

import torch


def generate_lockstep(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """`model.generate` with Hugging Face's `synced_gpus=True` (a rank that finished keeps running forward
    passes until every rank has). A rank with no prompts runs one dummy row and returns an empty result, so it
    still joins every collective; its generation length follows the other ranks' (it stops when they stop)."""
    if input_ids.shape[0] > 0:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, synced_gpus=True, **kwargs)
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else pad
    dummy = torch.full((1, max(input_ids.shape[1], 1)), pad, dtype=input_ids.dtype, device=input_ids.device)
    out = model.generate(input_ids=dummy, attention_mask=torch.ones_like(dummy), synced_gpus=True, **kwargs)
    return out[:0]

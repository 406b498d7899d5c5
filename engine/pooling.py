"""Sentence embeddings from a model's last hidden states, as sentence-transformers' all-MiniLM-L6-v2 makes them."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool_normalized(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the sequence, then L2 norm."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(summed, p=2, dim=-1)

"""Tiny seeded Hugging Face checkpoints (base + fine-tuned variants) written to tmp_path; no hub access."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as T
from safetensors.torch import load_file, save_file

from merge import methods
from merge.config import load_spec
from merge.methods import Context, apply

CONFIGS = {
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=32, tie_word_embeddings=True)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)),
    "clip": lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8,
        patch_size=4, projection_dim=8)),
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8,
        patch_size=4, num_channels=1, num_labels=4)),
}


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return CONFIGS[kind]().eval()


def make_family(root: Path, kind: str = "bert", tasks=("a", "b", "c"), scale: float = 0.005, seed: int = 0,
                **save_kwargs) -> tuple[Path, dict[str, Path]]:
    """Save a base model and one seeded perturbation of it per task; returns (base dir, {task: dir})."""
    base = build(kind, seed)
    base_dir = root / "base"
    base.save_pretrained(base_dir, **save_kwargs)
    models = {}
    for i, task in enumerate(tasks):
        model = build(kind, seed)
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        models[task] = root / task
        model.save_pretrained(models[task], **save_kwargs)
    return base_dir, models


def spec(base, models, out, **extra):
    """A merge spec of `base` and `models` (task -> folder) written to `out`."""
    return load_spec(None, {"base": str(base), "models": {k: str(v) for k, v in models.items()}, "out": str(out),
                            **extra})


def rewrite(folder, change) -> dict[str, torch.Tensor]:
    """Apply `change` to the tensors of `folder/model.safetensors` in place on disk; returns them."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


def run(name, tvs, weights=None, rng=None, thresholds=None, base=None, task_params=None, **params):
    """One merge method on stacked task vectors `tvs` (name -> (K, ...)), with equal weights by default."""
    method = methods.get(name)
    K = next(iter(tvs.values())).shape[0]
    w = torch.ones(K) if weights is None else torch.tensor(weights, dtype=torch.float32)
    ctx = Context(methods.resolve_params(method, params), w, thresholds, rng, task_params=task_params, base=base)
    return apply(method, tvs, ctx)


def shared_rng(seed):
    """One generator for every (task, tensor), drawn in order — the way PEFT draws from the global RNG."""
    g = torch.Generator().manual_seed(seed)
    return lambda k, name: g


def argsort_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's magnitude trim, written as it does it: keep the first `int(density · numel)` entries of a
    descending argsort of |x| (float32)."""
    keep = torch.zeros(x.numel())
    keep[torch.argsort(x.abs().reshape(-1).float(), descending=True)[: int(density * x.numel())]] = 1
    return x * keep.view(x.shape)

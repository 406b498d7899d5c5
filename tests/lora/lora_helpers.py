"""Tiny seeded models and PEFT adapters written to temporary folders (nothing is downloaded)."""
from __future__ import annotations

import copy
import json

import torch

BASE_NAME = "tessera/tiny-llama"
TARGETS = ("q_proj", "v_proj")


def tiny_llama(vocab_size: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.config._name_or_path = BASE_NAME
    return model


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(4321)
    cfg = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = MixtralForCausalLM(cfg).eval()
    model.config._name_or_path = "tessera/tiny-mixtral"
    return model


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2222)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg).eval()
    model.config._name_or_path = "tessera/tiny-qwen2"
    return model


def tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(3333)
    cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Qwen3MoeForCausalLM(cfg).eval()
    model.config._name_or_path = "tessera/tiny-qwen3-moe"
    return model


def save_adapter(model, folder, seed: int, r: int = 4, alpha: float = 8.0, targets=TARGETS, rslora=False,
                 **config):
    """Write a PEFT LoRA folder with random (non-zero) A and B for `model`; `config` goes to LoraConfig
    (rank_pattern, alpha_pattern, target_parameters, ...)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                     use_rslora=rslora, **config)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(str(folder))
    config_path = folder / "adapter_config.json"  # record the base model as a hub-trained adapter would
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = model.config._name_or_path
    config_path.write_text(json.dumps(config))
    return folder


def rescaled_copy(folder, dst, factor: float):
    """A copy of a PEFT adapter whose every module's scale is multiplied by `factor` (lora_alpha and each
    alpha_pattern entry), so PEFT with several adapters active computes a weighted mixture."""
    import shutil

    shutil.copytree(folder, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * factor
    config["alpha_pattern"] = {k: v * factor for k, v in (config.get("alpha_pattern") or {}).items()}
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def peft_mixture_logits(model, mix: dict, folders: dict, tmp, ids):
    """PEFT's output for one row's mixture: each adapter rescaled by its weight, all active at once."""
    from peft import PeftModel

    if not mix:
        with torch.no_grad():
            return model(input_ids=ids).logits
    names = list(mix)
    scaled = {n: rescaled_copy(folders[n], tmp / f"{n}-x{mix[n]}-{id(mix)}", mix[n]) for n in names}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(scaled[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(scaled[name]), adapter_name=name)
    peft_model.base_model.set_adapter(names)
    with torch.no_grad():
        return peft_model.eval()(input_ids=ids).logits


class LookupEncoder:
    """An encoder with hand-chosen vectors, so routing results can be computed by hand."""

    name = "test/lookup"

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.dim = len(next(iter(table.values())))
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        vectors = torch.tensor([self.table[t] for t in texts], dtype=torch.float32)
        return torch.nn.functional.normalize(vectors, dim=-1)

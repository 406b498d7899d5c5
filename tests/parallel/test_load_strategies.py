"""engine.load under every distributed strategy builds the same model as one process from the same checkpoint:
checkpoints saved by transformers for every family and layout (Switch encoder-only and encoder-decoder, Mixtral
with on-disk aliases, Qwen2-MoE in shards, Qwen3-MoE, OLMoE, BERT-MoE stacked), and a family that exists only in
this file."""
import pytest
import torch
import transformers

from engine.families import FAMILIES
from parallel_harness import run_ranks

STRATEGIES = ("moeshard", "ep", "ep-capacity", "auto")
SAVED = {"switch-encoder": ("switch_transformers", "SwitchTransformersEncoderModel"),
         "switch": ("switch_transformers", "SwitchTransformersForConditionalGeneration"),
         "mixtral": ("mixtral", "MixtralForCausalLM"), "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
         "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"), "olmoe": ("olmoe", "OlmoeForCausalLM"),
         "bert_moe": ("bert_moe", "BertMoeModel"), "flex_olmo": ("flex_olmo", "FlexOlmoForCausalLM")}


def flex_olmo_family():
    """A family no tessera file defines: FlexOlmo's blocks are OLMoE's, its checkpoints Qwen-style."""
    from engine.families import Family
    from engine.families.base import tiny
    from engine.families.stacked import GATE_DOWN_UP, stacked_converter

    return Family("flex_olmo", ("FlexOlmoSparseMoeBlock",),
                  stacked_converter(ffn="intermediate_size"),
                  tiny("FlexOlmoConfig", vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                  uses_experts_interface=True, expert_keys=GATE_DOWN_UP)


def output(model, rank: int) -> torch.Tensor:
    # Three tokens a rank: fewer than ep-capacity's minimum capacity, so it drops nothing and must match too.
    ids = torch.randint(2, 90, (1, 3), generator=torch.Generator().manual_seed(10 + rank))
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :2]} if model.config.is_encoder_decoder else {"input_ids": ids}
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def load_everywhere(rank, world, folders):
    """→ {(checkpoint, strategy): (class built, relative error against one process)}, the errors of two
    wrong model classes, and the files of a tiny model every rank built into the cache at once."""
    import engine
    from engine.families import register_family
    from engine.registry import get_model_entry, materialize_tiny, register_model

    register_family(flex_olmo_family())  # in this rank process only
    register_model(name="built-by-every-rank", family="olmoe", source="tiny", options={"seed": 7})
    results = {"tiny": sorted(p.name for p in materialize_tiny(get_model_entry("built-by-every-rank")).iterdir())}
    for name, folder in folders.items():
        reference = output(engine.load(folder, backend="torch", device="cpu"), rank)
        for strategy in STRATEGIES:
            model = engine.load(folder, strategy=strategy, backend="torch", device="cpu",
                                strategy_options={"calibration_tokens": (64, 512)})
            error = ((output(model, rank) - reference).abs().max() / reference.abs().max()).item()
            results[(name, strategy)] = (type(model).__name__, error)
    for wrong, folder, cls in (("lacks", folders["switch-encoder"], "SwitchTransformersForConditionalGeneration"),
                               ("unused", folders["switch"], "SwitchTransformersEncoderModel")):
        register_model(name=wrong, family="switch_transformers", source=folder, model_class=cls)
        try:
            engine.load(wrong, strategy="moeshard", backend="torch", device="cpu")
            results[wrong] = "loaded"
        except (KeyError, ValueError) as err:
            results[wrong] = str(err)
    return results


def save(family, class_name, folder, **save_kwargs):
    from engine.registry import build_tiny, transformers_class

    family = FAMILIES.get(family) or flex_olmo_family()
    cls = transformers_class(class_name, family.tiny_config())
    build_tiny(family, {}, cls, torch.float32).save_pretrained(folder, **save_kwargs)
    return str(folder)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    folders = {name: save(family, cls, root / name, **({"max_shard_size": "40KB"} if name == "qwen2_moe" else {}))
               for name, (family, cls) in SAVED.items()}
    return folders, run_ranks(load_everywhere, 2, folders, limit_s=240)


def test_every_strategy_loads_every_checkpoint_to_the_model_one_process_loads(loaded):
    folders, ranks = loaded
    for rank in ranks:
        for name, (_, class_name) in SAVED.items():
            for strategy in STRATEGIES:
                built, error = rank[(name, strategy)]
                assert built == class_name, (name, strategy)
                assert error < 1e-5, f"{name}/{strategy}: relative error {error}"


def test_a_wrong_model_class_names_the_tensors_and_folder(loaded):
    folders, ranks = loaded
    for rank in ranks:
        assert f"{folders['switch-encoder']}: the checkpoint has no tensor 'decoder.block." in rank["lacks"]
        assert f"{folders['switch']}: " in rank["unused"] and "not used by SwitchTransformersEncoderModel" in rank["unused"]
        assert "decoder.block." in rank["unused"]


def test_every_rank_builds_a_complete_cached_model_under_a_process_group(loaded):
    _, ranks = loaded
    for rank in ranks:  # transformers' save_pretrained writes on rank 0 only unless told otherwise
        assert {"config.json", "model.safetensors"} <= set(rank["tiny"])


def test_the_test_family_left_no_trace():
    assert "flex_olmo" not in FAMILIES

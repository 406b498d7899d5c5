"""Every family's tiny seeded model: Hugging Face eager against each of our backends."""
import pytest
import torch
import transformers

import engine
from engine.families import family_for
from engine.families import patch_moe
from engine.moe.patch import moe_blocks, routing_counts, track_routing
from engine.registry import get_model_entry, materialize_tiny

FAMILY_MODELS = ["tiny-switch", "tiny-switch-encoder", "tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe",
                 "tiny-olmoe", "tiny-bert-moe"]
BACKENDS = ["torch", "triton", "reference"]


def hf_eager(name, dtype=torch.float32):
    entry = get_model_entry(name)
    family = family_for(entry.family)
    cls = getattr(transformers, entry.model_class or family.auto_class)
    kwargs = {"experts_implementation": "eager"} if family.uses_experts_interface else {}
    return cls.from_pretrained(materialize_tiny(entry), dtype=dtype, **kwargs).eval()


def batch_with_padding(vocab=90):
    ids = torch.randint(2, vocab, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded sequence
    ids[1, 6:] = 0
    return ids, mask


def run(model, name, ids, mask):
    with torch.no_grad():
        if name == "tiny-switch":
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4]).logits
        if name in ("tiny-switch-encoder", "tiny-bert-moe"):
            return model(input_ids=ids, attention_mask=mask).last_hidden_state
        return model(input_ids=ids, attention_mask=mask).logits


def rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_fp32_parity_with_hugging_face(name, backend):
    ids, mask = batch_with_padding()
    want = run(hf_eager(name), name, ids, mask)
    model = engine.load(name, backend=backend, device="cpu")
    assert moe_blocks(model), "no MoE block was replaced"
    assert rel_err(run(model, name, ids, mask), want) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["tiny-switch-encoder", "tiny-mixtral", "tiny-qwen2-moe", "tiny-bert-moe"])
def test_bf16_within_documented_bound(name, backend):
    """bf16 bound: 3e-2 of the output's max magnitude (different summation orders over a 2-layer model)."""
    ids, mask = batch_with_padding()
    want = run(hf_eager(name, torch.bfloat16), name, ids, mask)
    model = engine.load(name, backend=backend, device="cpu", dtype="bfloat16")
    assert rel_err(run(model, name, ids, mask), want) <= 3e-2


def test_eager_backend_leaves_hugging_face_modules():
    model = engine.load("tiny-mixtral", backend="eager", device="cpu")
    assert not moe_blocks(model)
    assert model.config._experts_implementation == "eager"


def _switch_with_capacity(capacity):
    entry = get_model_entry("tiny-switch-encoder")
    folder = materialize_tiny(entry)
    config = transformers.AutoConfig.from_pretrained(folder)
    config.expert_capacity = capacity
    return transformers.SwitchTransformersEncoderModel.from_pretrained(folder, config=config).eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_switch_hf_capacity_drops_exactly_as_transformers(backend):
    ids = torch.randint(2, 90, (2, 16))
    hf = _switch_with_capacity(3)  # 16 tokens over 4 experts: some experts overflow
    want = hf(input_ids=ids).last_hidden_state
    ours = patch_moe(_switch_with_capacity(3), backend=backend, capacity="hf")
    track_routing(ours)
    with torch.no_grad():
        got = ours(input_ids=ids).last_hidden_state
    assert rel_err(got, want) <= 1e-5
    assert any(counts[-1] for counts in routing_counts(ours).values()), \
        "the capacity never bound: the test does not exercise dropping"


def test_switch_dropless_by_default_differs_from_capacity_limited():
    ids = torch.randint(2, 90, (2, 16))
    with torch.no_grad():
        dropless = patch_moe(_switch_with_capacity(3), backend="torch")(input_ids=ids).last_hidden_state
        unlimited = _switch_with_capacity(10_000)(input_ids=ids).last_hidden_state
    assert rel_err(dropless, unlimited) <= 1e-5  # dropless equals HF with capacity that never binds


def test_generate_matches_hugging_face():
    ids = torch.randint(2, 90, (2, 5))
    want = hf_eager("tiny-mixtral").generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    got = engine.load("tiny-mixtral", backend="triton", device="cpu").generate(
        input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_experts_implementation_tessera_runs_our_backend(monkeypatch):
    import engine.moe.experts as experts

    calls = []
    real = experts.run_experts
    monkeypatch.setattr(experts, "run_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    folder = materialize_tiny(get_model_entry("tiny-qwen3-moe"))
    ids, mask = batch_with_padding()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, experts_implementation="tessera").eval()
    got = run(model, "tiny-qwen3-moe", ids, mask)
    assert len(calls) == model.config.num_hidden_layers
    assert rel_err(got, run(hf_eager("tiny-qwen3-moe"), "tiny-qwen3-moe", ids, mask)) <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_cuda_parity_triton(name):
    ids, mask = batch_with_padding()
    ids, mask = ids.cuda(), mask.cuda()
    want = run(hf_eager(name).cuda(), name, ids, mask)
    model = engine.load(name, backend="triton", device="cuda")
    assert rel_err(run(model, name, ids, mask), want) <= 1e-5
    want16 = run(hf_eager(name, torch.bfloat16).cuda(), name, ids, mask)
    model16 = engine.load(name, backend="triton", device="cuda", dtype="bfloat16")
    assert rel_err(run(model16, name, ids, mask), want16) <= 3e-2

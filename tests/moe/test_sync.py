"""No MoE layer waits on the host, on any CUDA path, and a decode step's layer launches few kernels.

Everything runs on CPU under `sync_guard.SyncGuard`, which raises on every op that would read device values back
to the host on CUDA. The Triton kernels are mocked (`mocked_triton`) so the launcher's own torch glue is what
the guard sees. The torch backend's grouped-GEMM path (CUDA bf16 on Hopper) is forced on, since torch's
`_grouped_mm` also runs on CPU; its numbers are checked too. The per-expert loop (the CPU fallback) reads the
counts on purpose and is not covered. Multi-rank strategies are covered in tests/parallel (`no_host_sync`).
"""
import pytest
import torch

import engine.moe.experts as experts
from engine.families import FAMILIES
from engine.moe.patch import moe_blocks, routing_counts, track_routing
from engine.parallel.pass_sync import PassSync
from engine.parallel.runtime import Dist
from engine.parallel.strategy import install_executors, plan_parts
from sync_guard import HostSync, SyncGuard, guarded_layers, mocked_triton

triton = pytest.importorskip("triton")
FAMILY_NAMES = list(FAMILIES)
STRATEGIES = ("moeshard", "ep", "ep-capacity", "auto")
# Most launches a decode step's MoE layer may make, router and routing statistics included.
LAUNCH_BUDGET = 6


@pytest.fixture(autouse=True)
def no_router_health_check(monkeypatch, request):
    """Mocked kernels leave garbage in their outputs, which later routers would report as non-finite logits."""
    if "triton" in request.node.name:
        monkeypatch.setattr("engine.moe.layer.RouterHealth.raise_if_bad", lambda self: None)


def build(family_name: str, backend: str):
    import transformers

    from engine.families import patch_moe

    family = FAMILIES[family_name]
    torch.manual_seed(0)
    model = getattr(transformers, family.auto_class).from_config(family.tiny_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gate.weight" in name or "router" in name:
                param.normal_(0, 0.2)
    return patch_moe(model, backend=backend)


def inputs_for(family_name: str, batch=2, seq=5):
    ids = torch.randint(2, 90, (batch, seq), generator=torch.Generator().manual_seed(1))
    if FAMILIES[family_name].auto_class == "AutoModelForSeq2SeqLM":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
    return {"input_ids": ids}


def forward(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def grouped_mm(monkeypatch):
    """The torch backend takes its CUDA path: one `torch._grouped_mm` per projection."""
    monkeypatch.setattr(experts, "_grouped_mm_works", lambda x: True)


def test_guard_catches_what_syncs():
    x = torch.tensor([0, 2, 2, 1])
    for bad in (lambda: torch.bincount(x), lambda: x.nonzero(), lambda: x[x > 0], lambda: int(x.sum()),
                lambda: x.tolist(), lambda: torch.unique(x), lambda: x.repeat_interleave(x),
                lambda: bool(x.any()), lambda: x.cpu()):
        with pytest.raises(HostSync), SyncGuard():
            bad()
    with SyncGuard() as guard:  # and lets the rest through, counted
        x.repeat_interleave(x, output_size=5)
        torch.zeros(3).index_add_(0, x[:2], torch.ones(2))
    assert guard.launches


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_triton_path_never_syncs_while_routing_is_tracked(family_name):
    model = build(family_name, "triton")
    track_routing(model)
    guard = SyncGuard()
    with guarded_layers(guard), mocked_triton(guard):
        forward(model, inputs_for(family_name))
    assert guard.triton_launches(), "the triton backend must have launched its kernels"


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_grouped_mm_path_never_syncs_and_matches_the_reference(family_name, grouped_mm):
    inputs = inputs_for(family_name)
    reference = forward(build(family_name, "reference"), inputs)
    model = build(family_name, "torch")
    track_routing(model)
    with guarded_layers(SyncGuard()):
        out = forward(model, inputs)
    assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4)
    counts = routing_counts(model)  # read once, outside the layers
    tokens = sum(v.numel() for v in inputs.values())
    assert counts and all(0 < sum(c) <= tokens * 8 for c in counts.values())


def single_rank_strategy(model, strategy: str):
    """A strategy's executors on one rank without a process group (the collectives return their input)."""
    dist = Dist(None, 0, 1, "gloo", torch.device("cpu"))
    plan_parts(model, strategy, dist, meta=False)
    # A capacity factor this large drops nothing, so ep-capacity matches the single-process model too.
    return install_executors(model, strategy, dist, capacity_factor=100.0, calibration_tokens=(16, 64),
                             stats=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family_name", ["mixtral", "switch_transformers", "qwen2_moe"])
def test_strategy_layers_never_sync(family_name, strategy, grouped_mm):
    inputs = inputs_for(family_name)
    reference = forward(build(family_name, "torch"), inputs)
    model = build(family_name, "torch")
    state = single_rank_strategy(model, strategy)
    track_routing(model)
    with guarded_layers(SyncGuard()):
        out = forward(model, inputs)
    assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4)
    assert state.stats.host_syncs == 0  # one rank agrees with itself


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_layers_with_triton_never_sync(strategy):
    model = build("mixtral", "triton")
    single_rank_strategy(model, strategy)  # auto calibrates with the real kernels, outside the guard
    guard = SyncGuard()
    with guarded_layers(guard), mocked_triton(guard):
        forward(model, inputs_for("mixtral"))
    assert guard.triton_launches()


def decode_launches(family_name: str, batch: int, tracked: bool) -> list[str]:
    """Kernels one MoE layer launches for one decode step of `batch` sequences on the triton backend."""
    model = build(family_name, "triton")
    if tracked:
        track_routing(model)
    _, block = moe_blocks(model)[0]
    hidden = torch.randn(batch, 1, block.expert_weights().hidden_size)
    with torch.no_grad(), mocked_triton():
        block(hidden)  # first call: lazily made buffers (the router-health flags)
    guard = SyncGuard()
    with torch.no_grad(), mocked_triton(guard), guard:
        block(hidden)
    return guard.launches


@pytest.mark.parametrize("family_name", ["mixtral", "qwen3_moe", "olmoe", "switch_transformers"])
def test_decode_layer_launch_count(family_name):
    """Routed experts only: Qwen2-MoE's shared expert is a Hugging Face MLP added on top (nine torch ops)."""
    for batch in (1, 16):
        for tracked in (False, True):
            launches = decode_launches(family_name, batch, tracked)
            assert len(launches) <= LAUNCH_BUDGET, f"{len(launches)} launches: {launches}"
            assert launches[0] == "triton:_route_kernel" and launches.count("triton:_route_kernel") == 1


@pytest.mark.cuda
@pytest.mark.parametrize("backend, strategy", [("triton", "single"), ("torch", "single"), ("triton", "moeshard")])
def test_cuda_layers_under_sync_debug_mode(backend, strategy):
    """On a GPU, torch itself says whether anything synchronises: `set_sync_debug_mode("error")` raises on
    every synchronising CUDA call. bf16 on Hopper puts the torch backend on its grouped-GEMM path."""
    import engine

    model = engine.load("tiny-mixtral", backend=backend, device="cuda", dtype="bfloat16")
    if strategy == "moeshard":
        dist = Dist(None, 0, 1, "nccl", torch.device("cuda", torch.cuda.current_device()))
        plan_parts(model, strategy, dist, meta=False)
        install_executors(model, strategy, dist)
    track_routing(model)
    x = torch.randn(4, 3, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    blocks = [block for _, block in moe_blocks(model)]
    with torch.no_grad():
        for block in blocks:  # warm-up: kernel compilation and lazily made buffers may synchronise
            block(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for block in blocks:
                block(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(sum(c) > 0 for c in routing_counts(model).values())

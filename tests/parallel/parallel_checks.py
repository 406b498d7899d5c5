"""What each rank runs in the multi-process tests. Every function takes (rank, world, ...) and returns plain
values for the parent test to assert on; several checks share one process group to keep CI time low."""
from __future__ import annotations

import torch
import transformers

import engine
from engine.families import FAMILIES
from parallel_models import build, forward, rank_inputs

STRATEGIES = ("moeshard", "ep", "ep-capacity", "auto")
SMALL_CALIBRATION = (64, 512)  # auto's start-up measurement, sized for the tiny test models


def distribute(model, strategy, **kwargs):
    from engine.parallel import apply_strategy

    return apply_strategy(model, strategy, calibration_tokens=SMALL_CALIBRATION, **kwargs)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out - reference).abs().max() / reference.abs().max()).item()


def equivalence(rank, world, strategies=STRATEGIES, families=tuple(FAMILIES)):
    """(family, strategy) → (relative error against the single-process model on this rank's batch,
    host synchronisations in the pass, tokens dropped)."""
    results = {}
    for family in families:
        inputs = rank_inputs(family, rank)
        reference = forward(build(family), inputs)
        for strategy in strategies:
            # A capacity factor this large drops nothing, so ep-capacity must match too.
            model = distribute(build(family), strategy, capacity_factor=100.0, stats=True)
            out = forward(model, inputs)
            state = model.tessera_parallel
            results[(family, strategy)] = (relative_error(out, reference), state.stats.host_syncs,
                                           state.stats.tokens_dropped)
    return results


def bf16_models(rank, world):
    """bf16 activations with fp32 (Mixtral) or bf16 (Qwen3) routing weights through the packed collectives.
    → {(family, strategy): relative error against the single-process bf16 model}"""
    results = {}
    for family in ("mixtral", "qwen3_moe"):
        inputs = rank_inputs(family, rank)
        reference = forward(build(family).to(torch.bfloat16), inputs).float()
        for strategy in ("moeshard", "ep", "auto"):
            model = distribute(build(family).to(torch.bfloat16), strategy)
            results[(family, strategy)] = relative_error(forward(model, inputs).float(), reference)
    return results


def switch_encoder(rank, world):
    """An encoder-only model returns its hidden states under every strategy. → {strategy: (error, syncs)}"""
    from engine.families import patch_moe

    config = FAMILIES["switch_transformers"].tiny_config()

    def encoder():
        torch.manual_seed(0)
        return patch_moe(transformers.SwitchTransformersEncoderModel(config).eval(), backend="torch")

    inputs = {"input_ids": rank_inputs("switch_transformers", rank)["input_ids"]}
    reference = forward(encoder(), inputs)
    results = {}
    for strategy in STRATEGIES:
        model = distribute(encoder(), strategy, capacity_factor=100.0, stats=True)
        results[strategy] = (relative_error(forward(model, inputs), reference), model.tessera_parallel.stats.host_syncs)
    return results


def moeshard_triton(rank, world):
    inputs = {"input_ids": rank_inputs("qwen3_moe", rank)["input_ids"][:, :3]}
    reference = forward(build("qwen3_moe", "reference"), inputs)
    return relative_error(forward(distribute(build("qwen3_moe", "triton"), "moeshard"), inputs), reference)


def moeshard_unpacked(rank, world):
    """MoEShard's large-batch path (hidden states gathered on their own, not packed) on a small model."""
    from engine.parallel import moeshard

    inputs = rank_inputs("mixtral", rank)
    reference = forward(build("mixtral"), inputs)
    limit, moeshard.PACK_LIMIT_BYTES = moeshard.PACK_LIMIT_BYTES, 0
    try:
        return relative_error(forward(distribute(build("mixtral"), "moeshard"), inputs), reference)
    finally:
        moeshard.PACK_LIMIT_BYTES = limit


def empty_rank_layer(rank, world):
    """The last rank calls an MoE layer with no tokens: it still joins every collective. (Whole Hugging Face
    models cannot run an empty batch; generation gives such a rank a dummy row.) → {strategy: (shape, error)}"""
    hidden = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(7))
    if rank == world - 1:
        hidden = hidden[:0]
    reference = build("mixtral").model.layers[0].mlp(hidden)
    results = {}
    for strategy in STRATEGIES:
        block = distribute(build("mixtral"), strategy, capacity_factor=100.0).model.layers[0].mlp
        out = block(hidden)
        results[strategy] = (tuple(out.shape), (out - reference).abs().max().item() if out.numel() else 0.0)
    return results


def auto_switching(rank, world):
    """`auto` follows its cost model per layer (forced both ways here), every rank makes the same choice, both
    paths give the single-process output, and the previous pass's global expert counts reach every rank.
    → {"ep"/"moeshard": (choices, error)}, (global pairs seen by layer 0, this rank's pairs)"""
    from engine.parallel.cost_model import CostModel, Linear

    inputs = rank_inputs("mixtral", rank)
    reference = forward(build("mixtral"), inputs)
    model = distribute(build("mixtral"), "auto", stats=True)
    executors = list(model.tessera_parallel.executors.values())
    stats = model.tessera_parallel.stats
    results = {}
    for favoured, shard_cost, ep_cost in (("ep", 1.0, 0.0), ("moeshard", 0.0, 1.0)):
        for ex in executors:
            ex.model = CostModel(world, {ex.shape: Linear(shard_cost, 0.0)}, {ex.shape: (ep_cost, 0.0, 0.0)})
        stats.reset()
        out = forward(model, inputs)
        results[favoured] = (dict(stats.choices), relative_error(out, reference))
    forward(model, inputs)  # the gather at the start of this pass delivered the last pass's counts
    pairs_seen = sum(executors[0]._last[0])
    return results, (pairs_seen, inputs["input_ids"].numel() * 2)


def deepspeed_keep(ids: list[list[int]], num_experts: int, capacity: int) -> list[list[bool]]:
    """DeepSpeed-MoE's drop rule written out by hand: choice j of all tokens ranks after choices < j, then
    token order; a pair is kept if fewer than `capacity` pairs ranked before it on its expert."""
    seen = [0] * num_experts
    keep = [[False] * len(row) for row in ids]
    for j in range(len(ids[0]) if ids else 0):
        for t, row in enumerate(ids):
            e = row[j]
            if 0 <= e < num_experts:
                keep[t][j] = seen[e] < capacity
                seen[e] += 1
    return keep


def ep_capacity_drops(rank, world, capacity_factor):
    """An over-subscribed Mixtral layer under ep-capacity against the single-process layer with exactly
    DeepSpeed's dropped pairs removed. → (error, dropped counted, dropped expected, capacity)"""
    from engine.moe.experts import run_experts
    from engine.moe.router import route, router_logits
    from engine.parallel.expert_parallel import deepspeed_capacity

    tokens = [(2, 9), (3, 7), (1, 5)][: world]
    batch, seq = tokens[rank]
    rows = max(b * s for b, s in tokens)
    hidden = torch.randn(batch, seq, 32, generator=torch.Generator().manual_seed(rank))
    block = build("mixtral").model.layers[0].mlp
    x = hidden.reshape(-1, 32)
    ids, weights = route(block.spec, router_logits(block.spec, x, *block.router_parameters()), x.dtype)
    capacity = deepspeed_capacity(rows, block.spec.num_experts, block.spec.top_k, capacity_factor, 4)
    keep = torch.tensor(deepspeed_keep(ids.tolist(), block.spec.num_experts, capacity))
    kept_ids = torch.where(keep, ids, block.spec.num_experts)
    reference = run_experts(x, kept_ids, weights, block.expert_weights(), "reference")
    model = distribute(build("mixtral"), "ep-capacity", capacity_factor=capacity_factor, stats=True)
    out = model.model.layers[0].mlp(hidden).reshape(-1, 32)
    return ((out - reference).abs().max().item(), model.tessera_parallel.stats.tokens_dropped,
            int((~keep).sum()), capacity)


def rank_local_loading(rank, world, folders: dict, strategies=("moeshard", "ep")):
    """Load each saved checkpoint rank-locally; → {(family, strategy): (error, reads, loaded bytes, split)}."""
    from engine.parallel.runtime import split_range

    results = {}
    for family_name, folder in folders.items():
        family = FAMILIES[family_name]
        model_class = getattr(transformers, family.auto_class)
        full = model_class.from_pretrained(folder).eval()
        from engine.families import patch_moe

        inputs = rank_inputs(family_name, rank)
        reference = forward(patch_moe(full, backend="torch"), inputs)
        config = full.config
        ffn = {"switch_transformers": "d_ff", "mixtral": "intermediate_size",
               "bert_moe": "intermediate_size"}.get(family_name, "moe_intermediate_size")
        num_experts = getattr(config, "num_local_experts", None) or config.num_experts
        for strategy in strategies:
            model = engine.load(folder, strategy=strategy, backend="torch")
            state = model.tessera_parallel
            total = getattr(config, ffn) if strategy == "moeshard" else num_experts
            results[(family_name, strategy)] = (
                relative_error(forward(model, inputs), reference),
                [(r.key, r.index, r.nbytes) for r in state.reads], state.loaded_bytes,
                split_range(total, world, rank))
    return results


def lockstep_generation(rank, world, family_name, plans):
    """Greedy generation with a different number of prompts, prompt length and new-token budget on every
    rank (`plans[rank] = (prompts, length, max_new_tokens)`, 0 prompts allowed). → (sequences, reference)"""
    from engine.parallel import generate_lockstep

    prompts, length, new_tokens = plans[rank]
    ids = torch.randint(3, 90, (prompts, length), generator=torch.Generator().manual_seed(50 + rank))
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    results = {}
    reference = build(family_name).generate(input_ids=ids, **kwargs) if prompts else ids[:0]
    for strategy in ("moeshard", "ep", "auto"):
        model = distribute(build(family_name), strategy)
        results[strategy] = generate_lockstep(model, ids, torch.ones_like(ids), **kwargs)
    return results, reference


def fail_or_stall(rank, world, mode, stall_s=0.0):
    """Rank 1 dies (`raise`) or stalls for `stall_s` (`stall`, longer than the collective timeout) before its
    forward pass; rank 0 must raise, and so must rank 1 once it wakes up to a group that has gone."""
    import time

    model = distribute(build("mixtral"), "moeshard")
    if rank == 1:
        if mode == "raise":
            raise RuntimeError("injected failure on rank 1")
        time.sleep(stall_s)
    start = time.monotonic()
    try:
        forward(model, rank_inputs("mixtral", rank))
    except Exception as e:  # what the surviving rank sees, and how long it took to see it
        return ("raised", type(e).__name__, time.monotonic() - start)
    return ("returned", None, time.monotonic() - start)


def no_host_sync(rank, world):
    """Every strategy's MoE layers under the dispatch mode of tests/moe/sync_guard.py, on the torch backend's
    CUDA path (grouped GEMMs), routing tracked: → {strategy: (relative error, pass agreements)}. The guard
    raises on any host synchronisation inside a layer; the pass's agreement runs before the layers."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "moe"))
    import engine.moe.experts as experts
    from engine.moe.patch import track_routing
    from sync_guard import SyncGuard, guarded_layers

    original_check = experts._grouped_mm_works
    experts._grouped_mm_works = lambda x: True
    results = {}
    try:
        inputs = rank_inputs("mixtral", rank)
        reference = forward(build("mixtral"), inputs)
        for strategy in STRATEGIES:
            model = distribute(build("mixtral"), strategy, capacity_factor=100.0, stats=True)
            track_routing(model)
            with guarded_layers(SyncGuard()):
                out = forward(model, inputs)
            results[strategy] = (relative_error(out, reference), model.tessera_parallel.stats.host_syncs)
    finally:
        experts._grouped_mm_works = original_check
    return results


def failing_kernel_in_calibration(rank, world):
    """Rank 1's up-projection kernel runs out of shared memory at auto's larger calibration size (as Hopper's
    would at Mixtral shapes with an oversized tile). → ("raised", error type, message, seconds) or "returned"."""
    import time

    from triton.runtime.errors import OutOfResources
    from triton.runtime.interpreter import InterpretedFunction

    if rank == 1:
        run = InterpretedFunction.run

        def failing_run(self, *args, grid, warmup, **kwargs):
            if self.fn.__name__ == "_expert_up_kernel" and args[0].shape[0] >= 32:
                raise OutOfResources(245760, 232448, "shared memory")
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = failing_run
    from engine.parallel import apply_strategy

    start = time.monotonic()
    try:
        model = apply_strategy(build("mixtral", "triton"), "auto", calibration_tokens=(4, 16))
    except Exception as e:
        return ("raised", type(e).__name__, str(e), time.monotonic() - start)
    return ("returned", None, repr(model.tessera_parallel.cost_model), time.monotonic() - start)


def two_rank_session(rank, world, folders):
    """Everything the two-rank tests check, in one process group (one start-up instead of six)."""
    return {
        "equivalence": equivalence(rank, world),
        "encoder": switch_encoder(rank, world),
        "bf16": bf16_models(rank, world),
        "triton": moeshard_triton(rank, world),
        "unpacked": moeshard_unpacked(rank, world),
        "auto": auto_switching(rank, world),
        "empty_rank": empty_rank_layer(rank, world),
        "capacity": ep_capacity_drops(rank, world, 0.5),
        "no_sync": no_host_sync(rank, world),
        "loading": rank_local_loading(rank, world, folders),
        "generation": {f: lockstep_generation(rank, world, f, [(2, 5, 3), (1, 7, 6)])
                       for f in ("qwen3_moe", "switch_transformers")},
    }


def three_rank_session(rank, world, folders):
    """Uneven remainders (F = 40 or 24 over 3 ranks, 4 to 8 experts over 3), loading included, and a rank
    without prompts in generation."""
    return {
        "equivalence": equivalence(rank, world, ("moeshard", "ep", "auto")),
        "loading": rank_local_loading(rank, world, folders),
        "generation": lockstep_generation(rank, world, "mixtral", [(2, 4, 3), (1, 6, 5), (0, 4, 3)]),
    }

"""Two gloo ranks, the path N GPUs take with NCCL: every strategy against the single-process model for every
family, the Triton slice kernels, a rank without tokens, DeepSpeed's drop rule, rank-local loading and
lockstep generation."""
import pytest

from engine.families import FAMILIES
from harness import run_ranks
import checks


def test_every_strategy_matches_single_process_for_every_family():
    for rank_results in run_ranks(checks.equivalence, 2, limit_s=120):
        assert set(rank_results) == {(f, s) for f in FAMILIES for s in checks.STRATEGIES}
        for (family, strategy), (error, syncs, dropped) in rank_results.items():
            assert error < 1e-5, f"{family}/{strategy}: relative error {error}"
            assert syncs == 1, f"{family}/{strategy}: {syncs} host synchronisations in one forward pass"
            assert dropped == 0


def test_moeshard_runs_the_triton_slice_kernels():
    for error in run_ranks(checks.moeshard_triton, 2, limit_s=120):
        assert error < 1e-5


def test_rank_without_tokens_still_joins_the_collectives():
    rank0, rank1 = run_ranks(checks.empty_rank_layer, 2, limit_s=120)
    for strategy in checks.STRATEGIES:
        assert rank0[strategy][0] == (3, 5, 32) and rank0[strategy][1] < 1e-5
        assert rank1[strategy][0] == (0, 5, 32)


def test_ep_capacity_drops_exactly_as_deepspeed():
    for error, dropped, expected, capacity in run_ranks(checks.ep_capacity_drops, 2, 0.5, limit_s=120):
        assert expected > 0, "the test must over-subscribe some expert"
        assert dropped == expected
        assert error < 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Standard Hugging Face checkpoints: Switch (encoder-decoder), Mixtral (on-disk names differ from module
    names), Qwen2-MoE (shared expert) written as several safetensors shards with an index."""
    from models import build

    folders = {}
    for family, shard in (("switch_transformers", None), ("mixtral", None), ("qwen2_moe", "40KB")):
        folder = tmp_path_factory.mktemp(family)
        model = build(family, backend=None)
        model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        folders[family] = str(folder)
    return folders


def test_rank_local_loading_reads_only_this_ranks_part(checkpoints):
    from safetensors import safe_open
    import json
    import os

    results = run_ranks(checks.rank_local_loading, 2, checkpoints, limit_s=120)
    for rank, rank_results in enumerate(results):
        for (family, strategy), (error, reads, loaded, (start, stop)) in rank_results.items():
            assert error < 1e-5, f"{family}/{strategy}"
            expert_reads = [(k, index, n) for k, index, n in reads if ".experts." in k]
            assert expert_reads and sum(n for *_, n in expert_reads) == loaded["experts"]
            for key, index, _ in expert_reads:
                if strategy == "moeshard":  # rows [start, stop) of first matrices, same columns of second
                    assert (start, stop) in index, f"{key} read {index}, rank {rank} owns {start}:{stop}"
                else:  # whole experts, only this rank's
                    expert = int(key.split(".experts.")[1].split(".")[0].removeprefix("expert_"))
                    assert index == () and start <= expert < stop
    # Memory per rank: dense + experts / G. With an even split the two ranks read the same expert bytes,
    # and together exactly the checkpoint's expert bytes.
    for family, folder in checkpoints.items():
        total = 0
        names = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
        for name in names:
            with safe_open(os.path.join(folder, name), "pt") as f:
                total += sum(f.get_tensor(k).nbytes for k in f.keys() if ".experts." in k)
        for strategy in ("moeshard", "ep"):
            assert sum(r[(family, strategy)][2]["experts"] for r in results) == total


@pytest.mark.parametrize("family", ["qwen3_moe", "switch_transformers"])
def test_generation_in_lockstep_with_uneven_work(family):
    plans = [(2, 5, 3), (1, 7, 6)]  # (prompts, prompt length, new tokens) per rank
    for (outputs, reference) in run_ranks(checks.lockstep_generation, 2, family, plans, limit_s=120):
        for strategy, sequences in outputs.items():
            assert sequences.tolist() == reference.tolist(), strategy

"""Expert LoRA on two gloo ranks (the path N GPUs take with NCCL): under MoEShard (B rows of gate/up and A
columns of down follow the rank's FFN slice), expert parallelism (each rank keeps its experts' adapters), both
of auto's paths and ep-capacity, a mixed batch whose rows carry different adapters (other ranks' rows too, in
slots that differ between the ranks' caches) gives what one process gives, which equals PEFT, for Mixtral and
Qwen3-MoE; in the plain-PyTorch mixture and the Triton shrink/expand kernels. One process group runs it all."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))

from expert_rank_checks import BUILDS, expert_lora_session  # noqa: E402
from lora_helpers import save_adapter  # noqa: E402
from parallel_harness import run_ranks  # noqa: E402

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert_lora_ranks")
    folders = {}
    for family, build in BUILDS.items():  # the two families share module names: one folder set per family
        model = build()
        folders[family] = {
            "a": save_adapter(model, root / family / "a", seed=1, r=4, targets=("q_proj",), target_parameters=EXPERTS),
            "b": save_adapter(model, root / family / "b", seed=2, r=8, alpha=6.0, targets=("v_proj",), rslora=True,
                              target_parameters=EXPERTS),
            "c": save_adapter(model, root / family / "c", seed=3, r=16, targets=("k_proj",), target_parameters=EXPERTS),
            "d": save_adapter(model, root / family / "d", seed=4, r=4, targets=("o_proj",)),
            "f": save_adapter(model, root / family / "f", seed=6, r=4, targets=("v_proj",)),
            # Only down_proj (PEFT mixes only adapters that target the same parameters, so e runs alone).
            "e": save_adapter(model, root / family / "e", seed=5, r=4, targets=("q_proj",),
                              target_parameters=["mlp.experts.down_proj"]),
        }
    BUILDS["mixtral"]().save_pretrained(root / "mixtral-checkpoint")  # for rank-local loading (engine.load)
    folders = {f: {n: str(p) for n, p in adapters.items()} for f, adapters in folders.items()}
    return run_ranks(expert_lora_session, 2, folders, str(root), limit_s=240)


def test_one_process_expert_lora_equals_peft(ranks):
    seen = {family for rank in ranks for family in rank["single"]}
    assert seen == set(BUILDS)
    for rank in ranks:
        for family, error in rank["single"].items():
            assert error < 1e-4, f"{family}: relative error {error} against PEFT"


def test_every_strategy_gives_the_one_process_rows(ranks):
    for rank in ranks:
        runs = rank["runs"]
        assert {s for f, s, b in runs} >= {"moeshard", "ep", "ep-capacity", "auto:moeshard", "auto:ep"}
        assert {f for f, s, b in runs if s in ("moeshard", "ep")} == set(BUILDS)
        assert {b for f, s, b in runs if s in ("moeshard", "ep")} == {"torch", "triton"}
        assert min(rank["effect"].values()) > 1e-2  # the adapters change the rows far more than any error
        for (family, strategy, backend), (error, syncs) in runs.items():
            assert error < 1e-5, f"{family}/{strategy}/{backend}: relative error {error}"
            assert syncs == 1, f"{family}/{strategy}: {syncs} host synchronisations in one forward pass"


def test_auto_ran_the_path_it_was_forced_to(ranks):
    for rank in ranks:
        assert rank["choices"] == {"auto:moeshard": ["moeshard"], "auto:ep": ["ep"]}


def test_a_rank_without_expert_adapters_still_computes_the_other_ranks_adapters(ranks):
    """Later calls on one model: rank 1 runs the base model, then only attention adapters, two per row (more
    than rank 0's one expert adapter per row)."""
    for rank in ranks:
        assert max(rank["idle_rank"]) < 1e-5


def test_ranks_whose_adapters_together_exceed_the_cache_refuse_the_pass_alike_and_recover(ranks):
    for rank in ranks:
        message, error_after = rank["budget"]
        assert message is not None and "3 expert adapters together" in message and "['a', 'b', 'c']" in message
        assert error_after < 1e-5


def test_generation_under_moeshard_gives_the_one_process_tokens(ranks):
    assert all(rank["generate"] for rank in ranks)


def test_byte_counters_equal_the_bytes_the_collectives_moved(ranks):
    """ExchangeStats' bytes sent and received (what bench_moeshard reports) against the bytes each strategy's
    collectives were handed, with expert adapters' slots and weights travelling with the tokens."""
    for rank in ranks:
        assert {strategy for _, strategy, _ in rank["bytes"]} >= {"moeshard", "ep", "ep-capacity"}
        for run, (moved, counted) in rank["bytes"].items():
            assert moved[0] > 0 and counted == moved, run

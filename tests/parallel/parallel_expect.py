"""Assertions shared by the two- and three-rank tests."""
import os

from engine.families import FAMILIES


def is_expert_key(family: str, key: str) -> bool:
    """Per-expert tensors live under `.experts.`; stacked families keep all experts in named tensors."""
    stacked = FAMILIES[family].stacked_keys
    return key.rsplit(".", 1)[-1] in stacked.values() if stacked else ".experts." in key


def checkpoint_expert_bytes(folder: str, family: str) -> int:
    from safetensors import safe_open

    total = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                total += sum(f.get_tensor(k).nbytes for k in f.keys() if is_expert_key(family, k))
    return total


def assert_rank_local_reads(results: list, checkpoints: dict) -> None:
    """Every rank read expert tensors only as its own slice (MoEShard: rows [start, stop) of first matrices,
    the same columns of second ones) or its own whole experts (EP), the model it built matches the full one,
    and the ranks together read each expert byte exactly once: memory per rank = dense + experts / G."""
    for rank, rank_results in enumerate(results):
        for (family, strategy), (error, reads, loaded, (start, stop)) in rank_results.items():
            assert error < 1e-5, f"{family}/{strategy}: relative error {error}"
            expert_reads = [(k, index, n) for k, index, n in reads if is_expert_key(family, k)]
            assert expert_reads and sum(n for *_, n in expert_reads) == loaded["experts"]
            for key, index, _ in expert_reads:
                if strategy == "moeshard":
                    second_bias = key.endswith(".b2") and start == 0  # whole, read by the first slice only
                    assert (start, stop) in index or second_bias, f"{key} read {index}, rank {rank} owns {start}:{stop}"
                elif FAMILIES[family].stacked_keys:
                    assert index[0] == (start, stop), f"{key} read {index}, rank {rank} owns {start}:{stop}"
                else:
                    expert = int(key.split(".experts.")[1].split(".")[0].removeprefix("expert_"))
                    assert index == () and start <= expert < stop, f"{key} read by rank {rank}"
    for family, folder in checkpoints.items():
        for strategy in ("moeshard", "ep"):
            assert sum(r[(family, strategy)][2]["experts"] for r in results) == checkpoint_expert_bytes(folder, family)

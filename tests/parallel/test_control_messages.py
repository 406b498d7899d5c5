"""The serving coordinator's control messages between ranks (engine.serving.coordinator): one framed collective
for a message that fits the frame, a second for the rest of a longer one, on every rank alike."""
import pytest
from parallel_harness import run_ranks

from engine.serving.coordinator import FRAME_BYTES


def _exchange(rank, world, shared):
    from datetime import timedelta

    import torch.distributed as dist

    from engine.parallel.host_channel import host_channel
    from engine.serving.coordinator import all_gather_messages, broadcast_message

    group = dist.new_group(backend="gloo")
    channel = host_channel(group, timedelta(seconds=30), half_bytes=2 * FRAME_BYTES) if shared else None
    assert (channel is not None) == shared
    sizes = [0, 10, FRAME_BYTES - 40, FRAME_BYTES, 3 * FRAME_BYTES + 7]  # fits, about the frame, longer
    got = []
    for i, size in enumerate(sizes):
        sent = {"op": i, "payload": bytes(range(256)) * (size // 256) + b"x" * (size % 256)}
        got.append(broadcast_message(sent if rank == 0 else None, rank, group, channel) == sent)
        # each rank's own size, so some ranks' messages fit the frame while others' do not
        mine = {"rank": rank, "payload": b"r" * sizes[(i + rank) % len(sizes)]}
        everyone = all_gather_messages(mine, world, group, channel)
        got.append(everyone == [{"rank": r, "payload": b"r" * sizes[(i + r) % len(sizes)]} for r in range(world)])
    return got


@pytest.mark.parametrize("shared", [False, True], ids=["gloo", "host-channel"])
def test_messages_of_every_size_reach_every_rank_whole(shared):
    """Through gloo, and through the host channel (whose halves of two frames here carry the frames and the
    shorter rests, while the longest rest goes through gloo)."""
    for got in run_ranks(_exchange, 3, shared, env={"TESSERA_HOST_CHANNEL": "1"}):
        assert got == [True] * 10

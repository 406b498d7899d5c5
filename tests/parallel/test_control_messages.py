"""The serving coordinator's control messages between ranks (engine.serving.coordinator): one framed collective
for a message that fits the frame, a second for the rest of a longer one, on every rank alike."""
from parallel_harness import run_ranks

from engine.serving.coordinator import FRAME_BYTES


def _exchange(rank, world):
    import torch.distributed as dist

    from engine.serving.coordinator import all_gather_messages, broadcast_message

    group = dist.new_group(backend="gloo")
    sizes = [0, 10, FRAME_BYTES - 40, FRAME_BYTES, 3 * FRAME_BYTES + 7]  # fits, about the frame, longer
    got = []
    for i, size in enumerate(sizes):
        sent = {"op": i, "payload": bytes(range(256)) * (size // 256) + b"x" * (size % 256)}
        got.append(broadcast_message(sent if rank == 0 else None, rank, group) == sent)
        # each rank's own size, so some ranks' messages fit the frame while others' do not
        mine = {"rank": rank, "payload": b"r" * sizes[(i + rank) % len(sizes)]}
        everyone = all_gather_messages(mine, world, group)
        got.append(everyone == [{"rank": r, "payload": b"r" * sizes[(i + r) % len(sizes)]} for r in range(world)])
    return got


def test_messages_of_every_size_reach_every_rank_whole():
    for got in run_ranks(_exchange, 3):
        assert got == [True] * 10

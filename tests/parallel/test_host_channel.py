"""The host channel (engine.parallel.host_channel): CPU ranks of one host exchanging tensors through shared
memory give what gloo gives, collective after collective (so the two halves never mix up), fall back to gloo
for what does not fit, and a rank whose sockets close (as when it dies) makes its peers raise at once instead
of waiting out the timeout."""
import time

import pytest
from parallel_harness import run_ranks

ON = {"TESSERA_HOST_CHANNEL": "1"}  # the harness's ranks run without it by default


def _same_as_gloo(rank, world):
    import torch
    import torch.distributed as dist

    from engine.parallel.runtime import Dist

    shared = Dist.current()
    assert shared.channel is not None, "ranks of one host get a host channel"
    plain = Dist(None, rank, world, "gloo", torch.device("cpu"))  # the same group without it
    generator = torch.Generator().manual_seed(rank)
    checks = []
    for step in range(5):  # several rounds: both halves are written and read more than once
        for rows, dtype in ((3, torch.float32), (8, torch.int64), (1, torch.bfloat16), (0, torch.float32)):
            x = (torch.randn(rows * world, 6, generator=generator) * 100).to(dtype)
            checks.append(torch.equal(shared.all_gather(x), plain.all_gather(x)))
            checks.append(torch.equal(shared.all_to_all(x), plain.all_to_all(x)))
            if dtype.is_floating_point:
                checks.append(torch.equal(shared.reduce_scatter(x), plain.reduce_scatter(x)))
        source = torch.full((4,), float(rank + step))
        shared.channel.broadcast(source, src=0)
        checks.append(torch.equal(source, torch.full((4,), float(step))))
    big = torch.randn(shared.channel.half_bytes // 4 + 1)  # over a half: gloo carries it
    checks.append(torch.equal(shared.all_gather(big), plain.all_gather(big)))
    return checks


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_through_shared_memory_match_gloo(world):
    for checks in run_ranks(_same_as_gloo, world, env=ON):
        assert all(checks), checks


def _turned_off(rank, world):
    from engine.parallel.runtime import Dist

    return Dist.current().channel is None


def _too_big_for_dev_shm(rank, world):
    from datetime import timedelta

    from engine.parallel.host_channel import host_channel

    # rank 1 asks for more than /dev/shm holds: its region cannot be reserved, and every rank falls back alike
    return host_channel(None, timedelta(seconds=30), half_bytes=(1 << 50) if rank == 1 else 1 << 20) is None


def test_a_rank_that_cannot_set_it_up_makes_every_rank_use_gloo():
    assert run_ranks(_too_big_for_dev_shm, 2, env=ON) == [True, True]


def test_the_channel_can_be_turned_off():
    assert run_ranks(_turned_off, 2, env={"TESSERA_HOST_CHANNEL": "0"}) == [True, True]


def _one_rank_dies(rank, world):
    import torch

    from engine.parallel.host_channel import PeerGone
    from engine.parallel.runtime import Dist

    shared = Dist.current()
    shared.all_gather(torch.ones(2))
    if rank == 1:  # its sockets close, as when its process dies, before the next collective
        shared.channel.close()
        return None
    start = time.monotonic()
    try:
        shared.all_gather(torch.ones(2))
    except PeerGone as err:
        return time.monotonic() - start, str(err)
    return None


def test_a_rank_whose_sockets_close_makes_its_peer_raise_at_once():
    outcome = run_ranks(_one_rank_dies, 2, timeout_s=30, env=ON)[0]
    assert outcome is not None, "rank 0's collective went through although rank 1 had closed its sockets"
    waited, message = outcome
    assert waited < 5, "raised at once, not after the 30 s timeout"
    assert "lost rank 1" in message

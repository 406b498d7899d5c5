"""The pipe between rank 0 and its API process (engine.serving.api_process), both ends in this process over a
socket pair, with a stand-in engine that delivers as the continuous scheduler does (through `_post_all`)."""
import asyncio
import os
import socket
from multiprocessing.connection import Connection

import pytest

from engine.serving.api_process import EngineClient, RankZeroBridge
from engine.serving.batcher import Overloaded, Request
from engine.serving.coordinator import RankFailure
from engine.serving.sampling import Generation
from engine.serving.scheduler import _post_all


class StandInEngine:
    """Keeps what it is given; `deliver` hands tokens and ends over as one step of the scheduler does."""

    healthy, failure, queue_depth = True, None, 0

    def __init__(self):
        self.requests, self.refuse = {}, None

    def submit(self, request):
        if self.refuse is not None:
            raise self.refuse
        self.requests[request.id] = request

    def deliver(self, *items):
        """items: (request id, value): a token pair or the end (None or an exception) of a stream, or a whole
        request's result."""
        calls = []
        for request_id, value in items:
            request = self.requests[request_id]
            if request.stream:
                calls.append((request, request.tokens.put_nowait, (value,)))
            else:
                calls.append((request, request.future.set_result, (value,)))
        _post_all(next(iter(self.requests.values())).loop, calls)


class TwoArguments(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    engine = StandInEngine()
    bridge = RankZeroBridge(engine, metrics=None, adapter_names=None)
    bridge.connect(Connection(ours.detach()), {"world": 2, "router": None})
    conn = Connection(theirs.detach())
    _, settings = conn.recv()
    return engine, bridge, EngineClient(conn, settings)


async def until(condition, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_tokens_ends_refusals_and_cancellations_cross_the_pipe(pair):
    engine, bridge, client = pair

    async def run():
        loop = asyncio.get_running_loop()
        client.attach(loop)
        streamed = Request("generate", [1, 2], loop, params={"max_tokens": 3}, stream=True, tokens=asyncio.Queue())
        whole = Request("generate", [3], loop, params={"max_tokens": 2}, future=loop.create_future())
        await client.submit(streamed)
        await client.submit(whole)
        assert set(engine.requests) == {streamed.id, whole.id}
        assert engine.requests[streamed.id].token_ids == [1, 2] and engine.requests[whole.id].params["max_tokens"] == 2

        engine.deliver((streamed.id, (7, None)), (streamed.id, (8, (-0.5, [(8, -0.5)]))),
                       (whole.id, Generation([4, 5])))
        assert await streamed.tokens.get() == (7, None)
        assert await streamed.tokens.get() == (8, (-0.5, [(8, -0.5)]))
        assert (await whole.future).tokens == [4, 5]

        streamed.cancelled = True  # the client went away: sent with the next message rank 0 sends
        other = Request("generate", [9], loop, params={}, future=loop.create_future())
        await client.submit(other)
        engine.deliver((other.id, TwoArguments(1, 2)))  # an exception pickle could not rebuild
        with pytest.raises(RuntimeError, match="TwoArguments: 1 and 2"):
            await other.future
        await until(lambda: engine.requests[streamed.id].cancelled)
        assert streamed.id not in bridge.requests and not client.requests

        engine.refuse = Overloaded()
        with pytest.raises(Overloaded):
            await client.submit(Request("generate", [1], loop, params={}, stream=True, tokens=asyncio.Queue()))

    asyncio.run(run())


def test_when_rank_zero_goes_what_is_in_flight_fails_and_nothing_more_is_admitted(pair):
    engine, bridge, client = pair
    gone = []
    client.on_gone = lambda: gone.append(True)

    async def run():
        loop = asyncio.get_running_loop()
        client.attach(loop)
        streamed = Request("generate", [1], loop, params={}, stream=True, tokens=asyncio.Queue())
        whole = Request("generate", [2], loop, params={}, future=loop.create_future())
        await client.submit(streamed)
        await client.submit(whole)
        # rank 0 exits: its end of the socket pair closes (shut down through a duplicate of its descriptor, which
        # wakes the bridge's receiving thread as the process's exit would)
        socket.socket(fileno=os.dup(bridge.conn.fileno())).shutdown(socket.SHUT_RDWR)
        assert isinstance(await streamed.tokens.get(), RankFailure)
        with pytest.raises(RankFailure):
            await whole.future
        assert not client.healthy and gone == [True]
        with pytest.raises(RankFailure, match="rank 0 exited"):
            await client.submit(Request("generate", [3], loop, params={}, future=loop.create_future()))

    asyncio.run(run())

"""One client, several event loops: successive ``asyncio.run`` calls, and two live loops.

These tests are plain functions that run their own loops (``asyncio.run``), as a script,
a notebook cell or a Celery task does; the emulator serves from a loop of its own in a
background thread for the whole test, so it outlives each ``asyncio.run``.
``filterwarnings = error`` turns any "unclosed" warning (session, connector, socket) into a
failure, and each test collects garbage before it ends so such warnings land in it.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import aiohttp
import pytest

from flux_async import (
    AiohttpTransport,
    EventLoopError,
    FluxClient,
    OutageGuard,
    RateLimiter,
    RetryBudget,
    RetryPolicy,
)
from flux_async.emulator import Emulator, Fault

_T = TypeVar("_T")

# Quick real waits: these tests exercise the waiting machinery (limiter, guard, budget),
# so the policy is not a testing one.
FAST = RetryPolicy(backoff_initial=0.01, backoff_max=0.02, retry_after_max=0.2)


class LoopThread:
    """An event loop running in a background thread (a server's, or another client's)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture
def served() -> Iterator[Emulator]:
    """An emulator serving from its own thread, for the whole test."""
    server = LoopThread()
    emulator = Emulator()
    server.run(emulator.start())
    try:
        yield emulator
    finally:
        server.run(emulator.close())
        server.close()
        gc.collect()


def test_a_module_level_client_serves_successive_asyncio_runs(served: Emulator) -> None:
    """Each asyncio.run gets a pool of its own; the last one's closes with its loop."""
    client = FluxClient(base_url=served.base_url)  # made outside any loop
    transport = client.transport
    assert isinstance(transport, AiohttpTransport)
    sessions: list[aiohttp.ClientSession] = []

    async def job() -> list[bool]:
        response = await client.generate("a fox")
        assert response.urls
        results = await client.gather_generate(["a", "b", "c"], concurrency=2)
        assert transport.session is not None
        sessions.append(transport.session)
        return [r.ok for r in results]

    assert asyncio.run(job()) == [True] * 3
    assert sessions[0].closed  # closed as asyncio.run shut its loop down
    assert asyncio.run(job()) == [True] * 3
    assert sessions[1] is not sessions[0]
    assert sessions[1].closed
    assert served.stats.successes == 8
    asyncio.run(client.aclose())
    assert client.closed
    gc.collect()


def test_limiter_outage_guard_and_retry_budget_carry_over_loops(served: Emulator) -> None:
    """A 429 pause and cut, failed retries and a spent budget in one loop leave nothing
    that breaks the next: its calls retry, pace and succeed."""
    # A floor under the cut keeps the test quick: one 429 after one permit would
    # otherwise cut the rate to about 1/s.
    limiter = RateLimiter(min_rate=50)
    outage = OutageGuard(threshold=1)
    budget = RetryBudget(capacity=20)
    client = FluxClient(
        base_url=served.base_url, retry=FAST, limiter=limiter, outage=outage, retry_budget=budget
    )

    async def first() -> None:
        served.script(
            Fault.status(429, headers={"retry-after-ms": "50"}),
            Fault.status(503),
            Fault.status(503),  # a failed retry: opens the guard (threshold 1)
        )
        response = await client.generate("a fox")
        assert response.urls

    async def second() -> list[bool]:
        served.script(Fault.status(503), Fault.status(503), Fault.status(429))
        response = await client.generate("a crow")
        assert response.urls
        results = await client.gather_generate([f"p{i}" for i in range(6)], concurrency=3)
        return [r.ok for r in results]

    asyncio.run(first())
    assert limiter.statistics().rate_limited == 1
    assert limiter.statistics().cuts == 1  # paced from here on, in the next loop's clock
    assert outage.statistics().outages == 1
    assert not outage.is_open  # the probe that got through closed it
    assert asyncio.run(second()) == [True] * 6
    assert limiter.statistics().rate_limited == 2
    assert outage.statistics().waiting == 0
    assert budget.tokens > 0
    asyncio.run(client.aclose())
    gc.collect()


def test_use_from_a_second_live_loop_is_an_event_loop_error(served: Emulator) -> None:
    """Another loop still open (here running in a thread) keeps the client: a call or a
    fan-out from this loop raises EventLoopError before sending anything."""
    client = FluxClient(base_url=served.base_url)
    other = LoopThread()
    try:
        assert other.run(client.generate("from the other loop")).urls
        sent = served.stats.requests

        async def here() -> None:
            await client.generate("from this loop")

        async def batch() -> None:
            await client.gather_generate(["a", "b"])

        with pytest.raises(EventLoopError, match="one FluxClient per event loop"):
            asyncio.run(here())
        with pytest.raises(EventLoopError, match="still open"):
            asyncio.run(batch())
        assert served.stats.requests == sent
        # The owner is unaffected, and closes the client in its own loop.
        assert other.run(client.generate("still fine")).urls
        other.run(client.aclose())
    finally:
        other.close()
    gc.collect()


def test_a_transport_refuses_another_live_loop_and_closes_in_its_own(served: Emulator) -> None:
    """The transport checks the loop on every request, not only when making its pool."""
    transport = AiohttpTransport()
    client = FluxClient(base_url=served.base_url, transport=transport)
    other = LoopThread()
    try:
        other.run(client.generate("x"))

        async def close_here() -> None:
            await transport.aclose()

        with pytest.raises(EventLoopError, match="close this client in the event loop"):
            asyncio.run(close_here())
        assert transport.session is not None
        assert not transport.session.closed
        other.run(client.aclose())
        assert transport.session is None
    finally:
        other.close()
    gc.collect()


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_loop_closed_bare_still_gets_a_new_pool(
    served: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """``loop.close()`` without ``shutdown_asyncgens()`` cannot close the pool in time: the
    next loop makes a new one and says so (aiohttp may warn about the old one)."""
    client = FluxClient(base_url=served.base_url)
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(client.generate("x")).urls
    finally:
        loop.close()
    assert asyncio.run(client.generate("y")).urls
    assert "closed without finalising it" in caplog.text
    asyncio.run(client.aclose())
    gc.collect()

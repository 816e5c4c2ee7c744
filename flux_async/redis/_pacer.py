"""The pacer over Redis: GCRA in the ACQUIRE script, on the Redis server's clock.

A process books up to as many slots as it has waiters, none beyond the horizon, in one
round trip, and sleeps on its own clock until each slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Final, TypeAlias

from .._timing import SLACK
from ._connection import REDIS_ERRORS, Connection
from ._inflight import InFlight
from ._scripts import ACQUIRE, as_text, float_arg
from ._settings import LimiterConfig
from ._state import SharedState

__all__ = ["Booked", "SharedPacer", "WaitLine"]

logger = logging.getLogger("flux_async.redis")

# Permits booked in one round trip at most (more waiters ask again at once).
_MAX_BATCH: Final = 64
# Seconds between asks while every in-flight slot is leased by another process (a slot
# this process gives back wakes it at once).
_FULL_POLL: Final = 0.05
# Seconds: two answers may put one server time this far apart on our clock (their
# latencies differ); a gate that moved less than this since a booking has not moved.
_CLOCK_JITTER: Final = 0.02

#: A booked slot: (its time on this loop's clock, its lease id, the gate's opening as
#: known when booked). None instead: no slot, ask again (Redis failed meanwhile).
Booked: TypeAlias = tuple[float, str | None, float]


class WaitLine:
    """This process's waiters for a slot, first in, first out: each one a future the
    booking task resolves with its `Booked` slot.

    Example::

        line = WaitLine()
        line.futures.append(loop.create_future())
        line.fail(lambda: RuntimeError("closed"))   # every waiter raises it
    """

    __slots__ = ("futures",)

    def __init__(self) -> None:
        self.futures: deque[asyncio.Future[Booked | None]] = deque()

    def fail(self, error: Callable[[], BaseException]) -> None:
        """Empty the line; each waiter still waiting raises a fresh ``error()``."""
        futures = self.futures
        while futures:
            future = futures.popleft()
            if not future.done():
                future.set_exception(error())

    def wake(self) -> None:
        """Empty the line; each waiter still waiting gets no slot and asks again."""
        futures = self.futures
        while futures:
            future = futures.popleft()
            if not future.done():
                future.set_result(None)


class SharedPacer:
    """Shared GCRA pacing for this process's waiters, in FIFO order.

    One booking task runs while anyone waits: it asks the ACQUIRE script for a slot (and,
    with ``max_in_flight``, a lease) for up to 64 waiters at once, hands them out, and
    waits until the script says more may be due. Leases given back meanwhile ride along
    with the next booking. A Redis error goes to ``on_error`` (the fallback's), which
    empties the line.

    Example::

        pacer = SharedPacer(config, conn, state, inflight, line, fallback.redis_failed)
        while not await pacer.take(loop, asyncio.current_task()):
            ...   # no permit: Redis failed, or a 429 shut the gate over the slot
    """

    def __init__(
        self,
        config: LimiterConfig,
        conn: Connection,
        state: SharedState,
        inflight: InFlight,
        line: WaitLine,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._config = config
        self._conn = conn
        self._state = state
        self._inflight = inflight
        self._line = line
        self._on_error = on_error
        self._booker: asyncio.Task[None] | None = None

    async def take(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any] | None) -> bool:
        """Book a slot and sleep until it, holding its lease for ``task``. True when the
        permit stands; False when there is none (Redis failed, or a 429 shut the gate
        over the slot while we slept): ask again."""
        booked = await self._book(loop)
        if booked is None:
            return False  # Redis failed; on_redis_error="local": use the fallback
        slot, lease, known = booked
        inflight = self._inflight
        if lease is not None and task is not None:
            inflight.hold(task, lease)
        try:
            delay = slot - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        except BaseException:
            if task is not None:
                inflight.release(task)
            raise
        gate = self._state.gate.pause_until
        if slot + SLACK >= gate or gate < known + _CLOCK_JITTER:
            return True
        # A 429 shut the gate over our slot while we slept: the slot is forfeit.
        if task is not None:
            inflight.release(task)
        return False

    async def _book(self, loop: asyncio.AbstractEventLoop) -> Booked | None:
        """Join this process's line; the booking task books slots for it in FIFO order."""
        future: asyncio.Future[Booked | None] = loop.create_future()
        self._line.futures.append(future)
        if self._booker is None:
            self._booker = self._conn.spawn(self._run_booker())
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                booked = future.result()
                if booked is not None and booked[1] is not None:
                    self._inflight.queue_release(booked[1])
            raise

    async def _run_booker(self) -> None:
        """Book slots for the line, one round trip for up to `_MAX_BATCH` waiters."""
        loop = self._conn.loop
        assert loop is not None
        line = self._line.futures
        try:
            while True:
                while line and line[0].done():
                    line.popleft()
                if not line:
                    return
                want = 0
                for future in line:
                    if not future.done():
                        want += 1
                        if want == _MAX_BATCH:
                            break
                leases = self._inflight.new_ids(want)
                try:
                    status, waits, retry = await self._call_acquire(want, leases)
                except REDIS_ERRORS as exc:
                    self._on_error(exc)
                    return
                self._hand_out(loop.time(), waits, leases)
                if not any(not f.done() for f in line):
                    continue
                if status == "full":
                    await self._wait_for_slot(retry)
                elif retry > 0:
                    await asyncio.sleep(retry)
        except asyncio.CancelledError:
            # Cancelled by aclose() or at loop shutdown: nobody waits forever.
            self._line.fail(lambda: RuntimeError("the RedisRateLimiter was closed while waiting"))
            raise
        except Exception as exc:
            logger.exception("flux_async.redis: the booking task failed")
            failure = f"the RedisRateLimiter failed: {exc!r}"
            self._line.fail(lambda: RuntimeError(failure))
        finally:
            self._booker = None

    def _hand_out(self, now: float, waits: list[float], leases: list[str]) -> None:
        """Give the booked slots to the first waiters still waiting, in order."""
        line = self._line.futures
        for i, wait in enumerate(waits):
            lease = leases[i] if leases else None
            while line and line[0].done():
                line.popleft()
            if line:
                line.popleft().set_result((now + wait, lease, self._state.gate.pause_until))
            elif lease is not None:
                self._inflight.queue_release(lease)  # its waiter was cancelled meanwhile

    async def _wait_for_slot(self, retry: float) -> None:
        """Every in-flight slot is leased: wait until one of ours is given back, or poll."""
        event = self._conn.slot_freed
        assert event is not None
        event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), min(max(retry, 0.001), _FULL_POLL))

    async def _call_acquire(self, want: int, leases: list[str]) -> tuple[str, list[float], float]:
        """Book up to ``want`` slots: (status, waits in seconds, seconds before asking
        again)."""
        releases = self._inflight.take_releases()
        config = self._config
        settings = config.settings
        head: list[object] = [
            config.ceiling_arg,
            settings.burst,
            float_arg(settings.horizon),
            want,
            config.ttl_ms,
            settings.max_in_flight or 0,
            float_arg(settings.lease),
        ]
        tail: list[object] = [len(releases), *releases, *leases]
        try:
            reply = await self._state.call(ACQUIRE, config.keys, head, tail)
        except BaseException:
            # Sent again with the next booking (a lease never given back expires anyway).
            self._inflight.restore_releases(releases)
            raise
        granted = int(reply[9])
        waits = [int(w) / 1e6 for w in reply[12 : 12 + granted]]
        return as_text(reply[10]), waits, int(reply[11]) / 1e6

"""`ConcurrencyLimit`: at most so many tasks inside at once (the fan-out's in-flight cap)."""

from __future__ import annotations

import asyncio
import collections
import contextlib

from ._exceptions import ValidationError

__all__ = ["ConcurrencyLimit"]


class ConcurrencyLimit:
    """At most ``limit`` tasks inside at once: a FIFO semaphore with a wait-free fast path.

    Use ``async with limit:``, or `acquire` and `release` in pairs.

    Example::

        limit = ConcurrencyLimit(8)
        async with limit:
            await post(...)
        print(limit.in_flight, "of", limit.limit)
    """

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValidationError("limit", limit, "an int >= 1")
        self._limit = limit
        self._in_flight = 0
        self._free = limit
        # Waiters in arrival order. A hand-over gives the slot straight to the next live
        # waiter (set_result), so a released slot cannot be stolen by a newcomer.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def limit(self) -> int:
        """The most tasks allowed inside at once.

        Example::

            ConcurrencyLimit(8).limit  # 8
        """
        return self._limit

    @property
    def in_flight(self) -> int:
        """Tasks inside right now.

        Example::

            print(limit.in_flight, "of", limit.limit, "slots taken")
        """
        return self._in_flight

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is queued; never waits.

        The hot path: a fan-out with one worker per slot always finds one free, so it
        pays no coroutine for it.

        Example::

            if not limit.try_acquire():
                await limit.acquire()   # none free now: wait in line
        """
        if self._free and not self._waiters:
            self._free -= 1
            self._in_flight += 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a free slot and take it.

        Example::

            await limit.acquire()
            ...   # at most `limit.limit` tasks are here at once
            limit.release()
        """
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we were cancelled: pass it on.
                self._in_flight += 1
                self.release()
            else:
                # release() may already have dropped it as done.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        self._in_flight += 1

    def release(self) -> None:
        """Give back a slot taken with `acquire`.

        Example::

            limit.release()   # the slot goes to the first task waiting in `acquire`, if any
        """
        if not self._in_flight:
            raise RuntimeError("ConcurrencyLimit.release() without a matching acquire()")
        self._in_flight -= 1
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} limit={self._limit} in_flight={self._in_flight}>"

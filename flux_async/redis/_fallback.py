"""What a `RedisRateLimiter` does while Redis fails (``on_redis_error``).

``"fail"``: every permit waiting at that moment raises `RedisLimiterError`, and the next
permit tries Redis again. ``"local"``: an in-process `RateLimiter` at ``local_share`` of
the rate (and of ``max_in_flight``) takes over, Redis is pinged in the background, and
the limiter shares again when it answers.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine
from typing import Any, Final, Literal, cast

from .._concurrency import ConcurrencyLimit
from .._exceptions import FluxError
from .._limits import RateLimiter
from ._connection import REDIS_ERRORS, Connection
from ._inflight import InFlight
from ._pacer import WaitLine
from ._settings import LimiterConfig
from ._state import SharedState
from ._stats import Counters

__all__ = ["Fallback", "RedisLimiterError"]

logger = logging.getLogger("flux_async.redis")

# While falling back: the first ping after this many seconds, doubling up to the max.
_RECONNECT_FIRST: Final = 0.25
_RECONNECT_MAX: Final = 5.0


class RedisLimiterError(FluxError):
    """The shared limiter could not reach Redis, and ``on_redis_error="fail"``.

    Every permit waiting when Redis failed raises it (a fan-out reports it on the prompt,
    which was not sent). ``url`` is the Redis URL without its password; ``name`` the
    limiter's name. The next permit asked for tries Redis again.

    Example::

        try:
            await client.generate("a red fox")
        except RedisLimiterError as exc:
            print("no permit: Redis is down at", exc.url)
    """

    def __init__(self, message: str, *, url: str, name: str) -> None:
        super().__init__(message)
        self.url = url
        self.name = name


class Fallback:
    """The limiter's answer to a failed Redis call (`redis_failed`), and the in-process
    limiter it paces with meanwhile (``mode == "local"``).

    It empties the line of waiters either way: with an error each (``"fail"``), or with
    no slot, so they ask again and find the fallback (``"local"``), which paces at its
    share of the shared rate last seen.

    Example::

        fallback = Fallback(config, conn, counts, state, inflight, line)
        fallback.redis_failed(ConnectionError("refused"))
        if fallback.active:
            await fallback.acquire(asyncio.current_task())
    """

    def __init__(
        self,
        config: LimiterConfig,
        conn: Connection,
        counts: Counters,
        state: SharedState,
        inflight: InFlight,
        line: WaitLine,
    ) -> None:
        self.mode: Literal["shared", "local"] = "shared"
        self._config = config
        self._conn = conn
        self._counts = counts
        self._state = state
        self._inflight = inflight
        self._line = line
        self._limiter: RateLimiter | None = None
        self._slots: ConcurrencyLimit | None = None
        self._reconnect: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """Whether the in-process limiter paces now (Redis failed, ``"local"``)."""
        return self.mode == "local"

    def rate_in_force(self, shared: float | None) -> float | None:
        """The rate permits go at: the fallback's while it is active, else ``shared``."""
        limiter = self._limiter
        if self.mode == "local" and limiter is not None:
            return limiter.statistics().rate
        return shared

    def redis_failed(self, exc: BaseException) -> None:
        """A Redis call failed with ``exc``: fail the waiting permits, or fall back."""
        self._counts.redis_errors += 1
        settings = self._config.settings
        if settings.on_redis_error == "local":
            self._enter_local(exc)
            return
        message = (
            f"the shared rate limiter {settings.name!r} could not reach Redis at "
            f"{settings.redis_url} ({type(exc).__name__}: {exc}); no permit was given "
            "(on_redis_error='fail')"
        )
        if not self._state.failing:
            self._state.failing = True
            logger.warning("flux_async.redis: %s", message)

        def error() -> RedisLimiterError:
            failure = RedisLimiterError(message, url=settings.redis_url, name=settings.name)
            failure.__cause__ = exc
            return failure

        self._line.fail(error)

    def _enter_local(self, exc: BaseException) -> None:
        if self.mode == "local":
            return
        config = self._config
        settings = config.settings
        share = settings.local_share
        assert share is not None
        self.mode = "local"
        self._counts.fallbacks += 1
        shared = self._state.rate.rate
        base = shared if shared is not None else settings.rate
        local_rate = None if base is None else base * share
        self._limiter = config.local_limiter(local_rate)
        if settings.max_in_flight is not None:
            self._slots = ConcurrencyLimit(max(1, math.floor(settings.max_in_flight * share)))
        # Leases in Redis are out of reach: forget them (they expire there).
        self._inflight.forget_leases()
        logger.warning(
            "flux_async.redis: Redis at %s failed (%s: %s); limiter %r falls back to an "
            "in-process limiter at %s (local_share=%g) and shares again when Redis answers",
            settings.redis_url,
            type(exc).__name__,
            exc,
            settings.name,
            "no rate (unpaced)" if local_rate is None else f"{local_rate:g} req/s",
            share,
        )
        self._line.wake()
        if self._reconnect is None:
            self._reconnect = self._conn.spawn(self._reconnect_loop())

    async def acquire(self, task: asyncio.Task[Any] | None) -> None:
        """Wait for the in-process limiter's permit (and slot, held for ``task``)."""
        limiter, slots = self._limiter, self._slots
        assert limiter is not None
        if slots is not None:
            if not slots.try_acquire():
                await slots.acquire()
            if task is not None:
                self._inflight.hold(task, slots)
        try:
            if not limiter.try_acquire():
                await limiter.acquire()
        except BaseException:
            if task is not None:
                self._inflight.release(task)
            elif slots is not None:
                slots.release()
            raise

    def on_success(self) -> None:
        """Report a 2xx to the in-process limiter."""
        if self._limiter is not None:
            self._limiter.on_success()

    def on_rate_limited(self, retry_after: float | None) -> None:
        """Report a 429 to the in-process limiter."""
        if self._limiter is not None:
            self._limiter.on_rate_limited(retry_after)

    def reset(self) -> None:
        """Share again (the limiter was closed: the next use tries Redis first)."""
        self.mode = "shared"
        self._limiter = None
        self._slots = None

    async def _reconnect_loop(self) -> None:
        """While falling back: ping Redis, backing off, and share again when it answers."""
        delay = _RECONNECT_FIRST
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    await cast(Coroutine[Any, Any, Any], self._conn.client.ping())
                except REDIS_ERRORS:
                    delay = min(2 * delay, _RECONNECT_MAX)
                    continue
                break
            self.reset()
            self._state.forget()  # Redis may have lost the state: count afresh
            logger.info(
                "flux_async.redis: Redis at %s answers again; limiter %r shares its quota again",
                self._config.settings.redis_url,
                self._config.settings.name,
            )
        finally:
            self._reconnect = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} mode={self.mode} local={self._limiter!r}>"

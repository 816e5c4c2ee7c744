"""`RedisRateLimiter`: one API key's quota shared by every process that uses it.

The same three parts as the in-process `RateLimiter` (``docs/design.md``, "The limiter"),
with the state every process must agree on kept in Redis:

    pacer        GCRA in the ACQUIRE script, on the Redis server's clock; a process books
                 up to as many slots as it has waiters, none beyond the horizon, in one
                 round trip, and sleeps on its own clock until each slot
    pause gate   a field of the same hash (server time); any process's 429 shuts it
    controller   the unchanged `AdaptiveController`, one per process, driving
                 `SharedRate`: its cuts and growth steps go to the FEEDBACK script, which
                 applies at most one cut and one growth step per window for everyone
    in-flight    with ``max_in_flight``: a sorted set of leases with an expiry, renewed
                 while held, so a killed process frees its slots when its leases expire

Each controller must see what a single controller would see in one process: every
permit, success and 429 of every process. The scripts keep running totals of all three;
each process sends its own successes with its next call and its 429s at once, and feeds
its controller what the others did since its previous answer (a process makes one call
at a time, so its answers arrive in the order the scripts ran and the difference is
exact). Every answer also says when the pause gate opens or last opened, so a process
that slept through a pause measures send rates only over open time, and 429s it hears of
more than a window late are not taken as overload now. So N controllers measure the same
send rate and the same share of 429s, reach the same verdicts at about the same time,
and the first proposal of a window stands for all of them.

The parts, one module each; this one wires them together behind the `Limiter` interface:

    LimiterConfig     _settings.py    the settings, checked once; keys, script arguments
    Connection        _connection.py  the client, the event loop bound to, background tasks
    Script            _scripts.py     the Lua scripts, run with EVALSHA
    SharedState       _state.py       what this process knows of the hash; one call at a
                                      time, each answer replayed into the controller
    SharedPacer       _pacer.py       the line of waiters and the booking task (ACQUIRE)
    SharedGate        _gate.py        the pause gate as the answers and our 429s say
    Feedback          _feedback.py    429s, pauses and rate proposals sent (FEEDBACK)
    InFlight          _inflight.py    leases held per task, renewed, given back (RENEW)
    Fallback          _fallback.py    Redis failing: fail the waiters, or pace alone
    Counters          _stats.py       what statistics() reports
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from .._adaptive import (
    DEFAULT_DECREASE_FACTOR,
    DEFAULT_MIN_RATE,
    DEFAULT_TOLERANCE,
    DEFAULT_WINDOW,
)
from .._limits import DEFAULT_PER, Limiter
from .._pacer import DEFAULT_BURST, DEFAULT_HORIZON
from .._timing import check_retry_after
from ._connection import DEFAULT_REDIS_TIMEOUT, Connection, RedisClient, connect
from ._fallback import Fallback
from ._feedback import Feedback
from ._inflight import InFlight
from ._pacer import SharedPacer, WaitLine
from ._settings import (
    DEFAULT_KEY_TTL,
    DEFAULT_LEASE,
    DEFAULT_PREFIX,
    LimiterConfig,
    OnRedisError,
    RedisLimiterSettings,
)
from ._state import SharedRate, SharedState
from ._stats import Counters, RedisLimiterStatistics, describe

__all__ = ["RedisRateLimiter"]


class RedisRateLimiter(Limiter):
    """A `Limiter` whose quota is shared, through Redis, by every process using ``name``.

    Use it wherever a `Limiter` goes (``FluxClient(limiter=...)``,
    ``gather_generate(..., limiter=...)``) in every process (uvicorn workers, machines of
    a bulk job) that sends with one API key, with the same ``name`` and settings:

    * **Pacing** on the Redis server's clock: GCRA as in `RateLimiter` (``rate`` requests
      per ``per`` seconds, ``burst``, no startup burst) over all processes together;
      skewed client clocks change nothing. A permit costs one round trip (one for all
      of a process's waiters at once); none is booked more than ``horizon`` ahead, so a
      cut reaches every process within it.
    * **Pause gate**: a 429 whose ``Retry-After`` pauses the in-process limiter pauses
      every process until then (server time); they resume at the paced rate.
    * **Adaptive rate** (``adaptive=True``): every process runs `AdaptiveController` on
      the events of all processes; its cuts and growth steps change the shared rate, at
      most one cut and one growth step per ``window`` for everyone, never above the
      ceiling. With ``rate=None`` it is unpaced until the first 429, as `RateLimiter`.
    * **In-flight cap** (``max_in_flight``): at most that many attempts between a permit
      and their answer, over all processes. A slot is a lease that expires ``lease``
      seconds after its process last renewed it, so a process killed with ``kill -9``
      holds none for longer. A slot is given back when its attempt reports (2xx or 429),
      when the same task asks for its next permit, or when the task ends.
    * **Redis failing**, ``on_redis_error``: ``"fail"`` (the default) makes every permit
      waiting at that moment raise `RedisLimiterError`, naming the URL without password,
      and the next permit tries Redis again; ``"local"`` falls back to an in-process
      `RateLimiter` at ``local_share`` of the rate (and of ``max_in_flight``), warns
      once, pings Redis in the background and shares again when it answers.
    * **Keys**: ``<prefix>:{<SHA-256 of name>}:state`` and ``...:leases``: the name
      itself (which should not be an API key anyway) is never stored, and the hash tag
      keeps both keys in one Redis Cluster slot. They expire after ``key_ttl`` idle.

    ``decrease_factor``, ``window``, ``increase``, ``min_rate`` and ``tolerance`` are the
    `RateLimiter`'s. Bind it to one event loop; ``aclose()`` (or ``async with``) stops its
    background tasks and closes the client `from_url` made, after which another loop may
    use it.

    Example::

        limiter = RedisRateLimiter.from_url(
            "redis://redis:6379/0", rate=600, per=60, burst=5, name="images-prod"
        )
        async with limiter, FluxClient(limiter=limiter) as client:
            results = await client.gather_generate(prompts, concurrency=16)
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        name: str,
        rate: float | None = None,
        per: float = DEFAULT_PER,
        burst: int = DEFAULT_BURST,
        adaptive: bool = True,
        max_in_flight: int | None = None,
        lease: float = DEFAULT_LEASE,
        on_redis_error: OnRedisError = "fail",
        local_share: float | None = None,
        prefix: str = DEFAULT_PREFIX,
        horizon: float = DEFAULT_HORIZON,
        key_ttl: float = DEFAULT_KEY_TTL,
        decrease_factor: float = DEFAULT_DECREASE_FACTOR,
        window: float = DEFAULT_WINDOW,
        increase: float | None = None,
        min_rate: float = DEFAULT_MIN_RATE,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        config = LimiterConfig.make(
            client,
            name=name,
            rate=rate,
            per=per,
            burst=burst,
            adaptive=adaptive,
            max_in_flight=max_in_flight,
            lease=lease,
            on_redis_error=on_redis_error,
            local_share=local_share,
            prefix=prefix,
            horizon=horizon,
            key_ttl=key_ttl,
            decrease_factor=decrease_factor,
            window=window,
            increase=increase,
            min_rate=min_rate,
            tolerance=tolerance,
        )
        settings = config.settings
        self._config = config
        self._conn = conn = Connection(client)
        self._counts = counts = Counters()
        # Late-bound: the controller's rate changes go to every process through the
        # feedback part, which needs the controller and so is made last.
        self._rate = SharedRate(settings.rate, lambda rate, cut: self._feedback.propose(rate, cut))
        self._controller = controller = config.controller(self._rate)
        self._state = state = SharedState(conn, self._rate, controller, adaptive=settings.adaptive)
        self._inflight = inflight = InFlight(config, conn, counts)
        line = WaitLine()
        self._fallback = fallback = Fallback(config, conn, counts, state, inflight, line)
        self._pacer = SharedPacer(config, conn, state, inflight, line, fallback.redis_failed)
        self._feedback = Feedback(config, conn, state, controller, fallback)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        name: str,
        rate: float | None = None,
        per: float = DEFAULT_PER,
        burst: int = DEFAULT_BURST,
        adaptive: bool = True,
        max_in_flight: int | None = None,
        lease: float = DEFAULT_LEASE,
        on_redis_error: OnRedisError = "fail",
        local_share: float | None = None,
        prefix: str = DEFAULT_PREFIX,
        horizon: float = DEFAULT_HORIZON,
        key_ttl: float = DEFAULT_KEY_TTL,
        decrease_factor: float = DEFAULT_DECREASE_FACTOR,
        window: float = DEFAULT_WINDOW,
        increase: float | None = None,
        min_rate: float = DEFAULT_MIN_RATE,
        tolerance: float = DEFAULT_TOLERANCE,
        timeout: float = DEFAULT_REDIS_TIMEOUT,
    ) -> RedisRateLimiter:
        """A limiter with a client of its own for ``url`` (``redis://``, ``rediss://``,
        ``unix://``), which `aclose` closes; ``timeout`` bounds each connect and answer,
        and a failed command is retried twice within about 0.2 s before it counts as
        Redis failing. The other settings are the constructor's.

        Example::

            limiter = RedisRateLimiter.from_url(
                "redis://:secret@redis:6379/0", rate=10, name="images-prod"
            )
        """
        client = connect(url, timeout)
        limiter = cls(
            client,
            name=name,
            rate=rate,
            per=per,
            burst=burst,
            adaptive=adaptive,
            max_in_flight=max_in_flight,
            lease=lease,
            on_redis_error=on_redis_error,
            local_share=local_share,
            prefix=prefix,
            horizon=horizon,
            key_ttl=key_ttl,
            decrease_factor=decrease_factor,
            window=window,
            increase=increase,
            min_rate=min_rate,
            tolerance=tolerance,
        )
        limiter._conn.owns_client = True
        return limiter

    @property
    def settings(self) -> RedisLimiterSettings:
        """The settings it was made with (rate in requests per second).

        Example::

            limiter = RedisRateLimiter.from_url("redis://:secret@redis:6379/0", rate=10, name="k")
            limiter.settings.redis_url   # 'redis://redis:6379/0': never the password
        """
        return self._config.settings

    @property
    def keys(self) -> tuple[str, str]:
        """The Redis keys it uses: (state hash, leases sorted set), for ACLs and debugging.

        Example::

            state, leases = limiter.keys   # 'flux-async:{<hash of name>}:state', '...:leases'
        """
        return self._config.keys

    # -- the hot path ------------------------------------------------------------------

    async def acquire(self) -> None:
        """Wait until the shared pause gate is open, then for a shared pacing permit
        (and, with ``max_in_flight``, an in-flight slot).

        Raises `RedisLimiterError` when Redis fails while it waits and
        ``on_redis_error="fail"``.

        Example::

            await limiter.acquire()   # before every attempt, in every process sharing the name
        """
        loop = self._bind()
        task = asyncio.current_task()
        if task is not None and self._inflight.holds(task):
            self._inflight.release(task)  # its previous attempt ended without a report
        counts = self._counts
        counts.waiting += 1
        try:
            while True:
                if self._fallback.active:
                    await self._fallback.acquire(task)
                    break
                if await self._pacer.take(loop, task):
                    break
            counts.permits += 1
        finally:
            counts.waiting -= 1

    # -- feedback ----------------------------------------------------------------------

    def on_success(self) -> None:
        """Report a 2xx: give back the task's in-flight slot; after a calm window the
        controller proposes a growth step to every process.

        Example::

            limiter.on_success()   # after a 2xx
        """
        loop = self._bind()
        self._state.count_success()
        self._inflight.release_current(loop)
        if self._fallback.active:
            self._fallback.on_success()
        elif self._config.settings.adaptive:
            self._controller.on_success(loop.time)

    def on_rate_limited(self, retry_after: float | None) -> None:
        """Report a 429: as `RateLimiter.on_rate_limited`, for every process sharing
        ``name`` (the pause goes to Redis at once; other processes see it on their next
        booking, within the horizon).

        Example::

            limiter.on_rate_limited(5.0)   # a 429 with "Retry-After: 5"
        """
        check_retry_after(retry_after)
        loop = self._bind()
        now = loop.time()
        self._counts.rate_limited += 1
        self._state.count_rate_limited()
        self._inflight.release_current(loop)
        if self._fallback.active:
            self._fallback.on_rate_limited(retry_after)
        else:
            self._feedback.on_rate_limited(now, retry_after)

    # -- the event loop ----------------------------------------------------------------

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop, fresh = self._conn.bind()
        if fresh:
            self._state.gate.forget_times()
            self._state.forget()
            self._controller.forget_times()
        return loop

    async def aclose(self) -> None:
        """Stop the background tasks, give back held slots, close the client `from_url`
        made (a client you passed in stays open). The limiter may be used again after,
        in any event loop.

        Example::

            limiter = RedisRateLimiter.from_url(url, rate=10, name="images")
            try:
                ...
            finally:
                await limiter.aclose()
        """
        await self._conn.cancel_tasks()
        await self._inflight.close(give_back=not self._fallback.active)
        await self._conn.close()
        self._fallback.reset()

    async def __aenter__(self) -> RedisRateLimiter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- state -------------------------------------------------------------------------

    def statistics(self) -> RedisLimiterStatistics:
        """Return a snapshot (no Redis call; safe from any thread).

        Example::

            limiter.statistics().mode   # "shared", or "local" while falling back
        """
        loop = self._conn.loop
        counts = self._counts
        return RedisLimiterStatistics(
            rate=self._fallback.rate_in_force(self._rate.rate),
            ceiling=self._config.settings.rate,
            burst=self._config.settings.burst,
            paused_for=0.0 if loop is None else self._state.gate.paused_for(loop.time()),
            permits=counts.permits,
            waiting=counts.waiting,
            rate_limited=counts.rate_limited,
            cuts=self._state.cuts,
            mode=self._fallback.mode,
            in_flight=self._inflight.count,
            redis_errors=counts.redis_errors,
            fallbacks=counts.fallbacks,
        )

    def __repr__(self) -> str:
        return describe(type(self).__name__, self._config.settings, self.statistics())

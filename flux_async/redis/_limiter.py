"""`RedisRateLimiter`: one API key's quota shared by every process that uses it.

The same three parts as the in-process `RateLimiter` (``docs/design.md``, "The limiter"),
with the state every process must agree on kept in Redis:

    pacer        GCRA in the ACQUIRE script, on the Redis server's clock; a process books
                 up to as many slots as it has waiters, none beyond the horizon, in one
                 round trip, and sleeps on its own clock until each slot
    pause gate   a field of the same hash (server time); any process's 429 shuts it
    controller   the unchanged `AdaptiveController`, one per process, driving
                 `_SharedRate`: its cuts and growth steps go to the FEEDBACK script, which
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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Final, Literal, TypeAlias, cast

import attrs
import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from .._adaptive import (
    DEFAULT_DECREASE_FACTOR,
    DEFAULT_MIN_RATE,
    DEFAULT_TOLERANCE,
    DEFAULT_WINDOW,
    AdaptiveController,
)
from .._concurrency import ConcurrencyLimit
from .._exceptions import FluxError, ValidationError
from .._limits import DEFAULT_PER, Limiter, LimiterStatistics, RateLimiter
from .._pacer import DEFAULT_BURST, DEFAULT_HORIZON
from .._timing import NEVER, SLACK, check_positive
from ._scripts import ACQUIRE, FEEDBACK, RENEW, Script

__all__ = [
    "DEFAULT_KEY_TTL",
    "DEFAULT_LEASE",
    "DEFAULT_PREFIX",
    "DEFAULT_REDIS_TIMEOUT",
    "RedisLimiterError",
    "RedisLimiterSettings",
    "RedisLimiterStatistics",
    "RedisRateLimiter",
]

logger = logging.getLogger("flux_async.redis")

#: Every key starts with this (then ``:{<hash of name>}:``).
DEFAULT_PREFIX = "flux-async"
#: Seconds a lease (one in-flight slot, with ``max_in_flight``) lives unless renewed; a
#: process renews its leases every third of this, so only a dead process loses them.
DEFAULT_LEASE = 10.0
#: Seconds: the limiter's keys expire after this long without use.
DEFAULT_KEY_TTL = 3600.0
#: Seconds: `from_url` clients give up on a connect or an answer after this long.
DEFAULT_REDIS_TIMEOUT = 2.0

RedisClient: TypeAlias = "redis.asyncio.Redis | RedisCluster"
OnRedisError: TypeAlias = Literal["fail", "local"]

# Permits booked in one round trip at most (more waiters ask again at once).
_MAX_BATCH: Final = 64
# Seconds between asks while every in-flight slot is leased by another process (a slot
# this process gives back wakes it at once).
_FULL_POLL: Final = 0.05
# While falling back: the first ping after this many seconds, doubling up to the max.
_RECONNECT_FIRST: Final = 0.25
_RECONNECT_MAX: Final = 5.0
# The most events of other processes replayed into the controller from one answer (a
# process idle for long catches up on at most this many: more than a window holds).
_MAX_REPLAY: Final = 10_000
_REDIS_ERRORS: Final = (redis.exceptions.RedisError, OSError, TimeoutError)
# The scripts' "never" for a time (the pause gate never shut, no 429 ever).
_NEVER_US: Final = -4503599627370496
# Seconds: two answers may put one server time this far apart on our clock (their
# latencies differ); a gate that moved less than this since a booking has not moved.
_CLOCK_JITTER: Final = 0.02

# (slot on this loop's clock, lease id, the gate's opening as known when booked)
_Booked: TypeAlias = tuple[float, str | None, float]
_Hold: TypeAlias = "str | ConcurrencyLimit"  # a Redis lease id, or a fallback slot


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


@attrs.frozen(kw_only=True)
class RedisLimiterSettings:
    """A `RedisRateLimiter`'s settings, checked when it is made (``limiter.settings``).

    * ``name``: the quota's name, shared by every process that shares it;
    * ``rate``: the ceiling in requests per second (``rate / per`` as given), or None;
    * ``burst``, ``horizon``, ``adaptive``: as for `RateLimiter`;
    * ``max_in_flight``: the cap on attempts in flight across all processes, or None;
      ``lease``: seconds a slot outlives a process that stopped renewing it;
    * ``on_redis_error``: ``"fail"`` or ``"local"``; ``local_share``: the share of the
      rate one process takes while falling back (None with ``"fail"``);
    * ``prefix``, ``key_ttl``: where the keys live and how long they outlive their use;
    * ``redis_url``: the Redis server, without a password (what errors and logs show).

    Example::

        limiter = RedisRateLimiter.from_url("redis://localhost", rate=600, per=60, name="k1")
        print(limiter.settings.rate)   # 10.0 (requests per second)
    """

    name: str
    rate: float | None
    burst: int
    horizon: float
    adaptive: bool
    max_in_flight: int | None
    lease: float
    on_redis_error: OnRedisError
    local_share: float | None
    prefix: str
    key_ttl: float
    redis_url: str


@attrs.frozen(kw_only=True)
class RedisLimiterStatistics(LimiterStatistics):
    """`LimiterStatistics` of a `RedisRateLimiter`, with what sharing adds.

    ``rate`` is the shared rate as this process last saw it (the fallback's while in
    ``"local"`` mode), ``cuts`` the cuts applied by all processes together, ``permits``,
    ``waiting`` and ``rate_limited`` this process's own. Added:

    * ``mode``: ``"shared"``, or ``"local"`` while Redis is unreachable and
      ``on_redis_error="local"``;
    * ``in_flight``: in-flight slots this process holds (``max_in_flight`` only);
    * ``redis_errors``: Redis calls that failed; ``fallbacks``: times it fell back.

    Example::

        stats = limiter.statistics()
        if stats.mode == "local":
            print("Redis is down; pacing alone at", stats.rate)
    """

    mode: Literal["shared", "local"]
    in_flight: int
    redis_errors: int
    fallbacks: int


class _SharedRate:
    """The `RateTarget` each process's controller drives: the shared rate as last seen;
    setting it proposes the change to Redis (`RedisRateLimiter._propose`)."""

    __slots__ = ("_propose", "rate")

    rate: float | None

    def __init__(self, rate: float | None, propose: Callable[[float | None, bool], None]) -> None:
        self.rate = rate
        self._propose = propose

    def set_rate(self, rate: float | None, *, cut: bool = False) -> None:
        self.rate = rate
        self._propose(rate, cut)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fmt(value: float) -> str:
    return repr(float(value))


def describe_client(client: object) -> str:
    """Where ``client`` connects, as a URL without password (for errors and logs).

    Example::

        describe_client(redis.asyncio.Redis.from_url("redis://u:pw@h:6380/2"))
        # 'redis://u@h:6380/2'
    """
    pool = getattr(client, "connection_pool", None)
    kwargs: dict[str, Any] = dict(getattr(pool, "connection_kwargs", {}) or {})
    if not kwargs:
        node = getattr(client, "get_default_node", lambda: None)()
        if node is not None:
            return f"redis-cluster://{node.host}:{node.port}"
        return f"<{type(client).__name__}>"
    user = kwargs.get("username")
    who = f"{user}@" if user else ""
    if kwargs.get("path"):
        return f"unix://{who}{kwargs['path']}?db={kwargs.get('db', 0)}"
    host = str(kwargs.get("host", "localhost"))
    if ":" in host:
        host = f"[{host}]"
    connection_class = getattr(pool, "connection_class", None)
    scheme = "rediss" if "SSL" in getattr(connection_class, "__name__", "") else "redis"
    return f"{scheme}://{who}{host}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


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
        if not isinstance(client, redis.asyncio.Redis | RedisCluster):
            raise ValidationError(
                "client", client, "a redis.asyncio.Redis or redis.asyncio.RedisCluster"
            )
        if not isinstance(name, str) or not name:
            raise ValidationError("name", name, "a non-empty str")
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValidationError("prefix", prefix, "a non-empty str without { or }")
        per = check_positive("per", per)
        ceiling = None if rate is None else check_positive("rate", rate) / per
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValidationError("burst", burst, "an int >= 1")
        horizon = check_positive("horizon", horizon)
        if max_in_flight is not None and (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ValidationError("max_in_flight", max_in_flight, "an int >= 1, or None")
        lease = check_positive("lease", lease)
        key_ttl = check_positive("key_ttl", key_ttl)
        if key_ttl < lease:
            raise ValidationError("key_ttl", key_ttl, f"seconds >= lease ({lease:g})")
        if on_redis_error not in ("fail", "local"):
            raise ValidationError("on_redis_error", on_redis_error, "'fail' or 'local'")
        if on_redis_error == "local":
            if local_share is None:
                raise ValidationError(
                    "local_share",
                    local_share,
                    "the share of the rate one process may use without Redis "
                    "(0 < share <= 1, e.g. 1 / processes) when on_redis_error='local'",
                )
            if (
                isinstance(local_share, bool)
                or not isinstance(local_share, int | float)
                or not 0 < local_share <= 1
            ):
                raise ValidationError("local_share", local_share, "a number > 0 and <= 1")
        elif local_share is not None:
            raise ValidationError("local_share", local_share, "None unless on_redis_error='local'")

        self._client: RedisClient = client
        self._owns_client = False
        self._settings = RedisLimiterSettings(
            name=name,
            rate=ceiling,
            burst=burst,
            horizon=horizon,
            adaptive=bool(adaptive),
            max_in_flight=max_in_flight,
            lease=lease,
            on_redis_error=on_redis_error,
            local_share=None if local_share is None else float(local_share),
            prefix=prefix,
            key_ttl=key_ttl,
            redis_url=describe_client(client),
        )
        digest = hashlib.sha256(name.encode()).hexdigest()[:24]
        self._state_key = f"{prefix}:{{{digest}}}:state"
        self._leases_key = f"{prefix}:{{{digest}}}:leases"
        self._ceiling = ceiling
        self._adaptive = bool(adaptive)
        self._rate = _SharedRate(ceiling, self._propose)
        self._controller = AdaptiveController(
            self._rate,
            ceiling=ceiling,
            decrease_factor=decrease_factor,
            window=window,
            increase=increase,
            min_rate=min_rate,
            tolerance=tolerance,
        )
        self._local_options: dict[str, Any] = {
            "burst": burst,
            "adaptive": adaptive,
            "decrease_factor": decrease_factor,
            "window": window,
            "increase": increase,
            "min_rate": min_rate,
            "horizon": horizon,
            "tolerance": tolerance,
        }
        # Script arguments that never change.
        self._ceiling_arg = _fmt(ceiling or 0.0)
        self._ttl_ms = str(math.ceil(key_ttl * 1000))
        self._tag = uuid.uuid4().hex[:16]  # this limiter's lease ids: tag:counter
        self._lease_seq = 0

        # Per-loop state, made in the loop that first uses the limiter.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._line: deque[asyncio.Future[_Booked | None]] = deque()
        self._booker: asyncio.Task[None] | None = None
        self._feedback: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._slot_freed: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None  # one Redis call at a time (see _call)
        # The pause gate on this loop's clock: as the latest booking answer says it is,
        # and as this process's own 429s and feedback answers have shut it.
        self._pause_seen = NEVER
        self._pause_own = NEVER
        # What this process knows of the shared hash.
        self._epoch: str | None = None
        self._ver = -1
        self._cuts = 0
        self._seen = (0, 0, 0)  # permits, successes, 429s of all processes
        self._unreported = [0, 0]  # own successes, 429s not yet counted in Redis
        self._proposal: tuple[str, float] | None = None  # ("cut" | "grow", rate; 0 unpaced)
        self._pause_for = 0.0
        # In-flight slots held, per task; lease ids to give back.
        self._held: dict[asyncio.Task[Any], _Hold] = {}
        self._to_release: list[str] = []
        # Redis failing.
        self._mode: Literal["shared", "local"] = "shared"
        self._fallback: RateLimiter | None = None
        self._fallback_slots: ConcurrencyLimit | None = None
        self._failing = False  # warned about this outage ("fail" mode)

        self._permits = 0
        self._waiting = 0
        self._rate_limited = 0
        self._redis_errors = 0
        self._fallbacks = 0

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
        if not isinstance(url, str):
            raise ValidationError("url", url, "a redis://, rediss:// or unix:// URL")
        timeout = check_positive("timeout", timeout)
        try:
            client = redis.asyncio.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                # Two quick retries ride over a connection that went stale (Redis
                # restarted); redis-py's default (10, backing off to 1 s) would hold a
                # waiting permit for seconds before saying Redis is down.
                retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2),
            )
        except ValueError as exc:
            raise ValidationError(
                "url", url, f"a redis://, rediss:// or unix:// URL ({exc})"
            ) from None
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
        limiter._owns_client = True
        return limiter

    @property
    def settings(self) -> RedisLimiterSettings:
        """The settings it was made with (rate in requests per second)."""
        return self._settings

    @property
    def keys(self) -> tuple[str, str]:
        """The Redis keys it uses: (state hash, leases sorted set), for ACLs and debugging."""
        return (self._state_key, self._leases_key)

    # -- the hot path ------------------------------------------------------------------

    async def acquire(self) -> None:
        """Wait until the shared pause gate is open, then for a shared pacing permit
        (and, with ``max_in_flight``, an in-flight slot).

        Raises `RedisLimiterError` when Redis fails while it waits and
        ``on_redis_error="fail"``.
        """
        loop = self._bind()
        task = asyncio.current_task()
        if task is not None and task in self._held:
            self._release(task)  # its previous attempt ended without a report
        self._waiting += 1
        try:
            while True:
                if self._mode == "local":
                    await self._acquire_local(task)
                    break
                booked = await self._book(loop)
                if booked is None:
                    continue  # Redis failed; on_redis_error="local": use the fallback
                slot, lease, known = booked
                if lease is not None and task is not None:
                    self._hold(task, lease)
                try:
                    delay = slot - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                except BaseException:
                    if task is not None:
                        self._release(task)
                    raise
                gate = self._pause_until()
                if slot + SLACK >= gate or gate < known + _CLOCK_JITTER:
                    break
                # A 429 shut the gate over our slot while we slept: the slot is forfeit.
                if task is not None:
                    self._release(task)
            self._permits += 1
        finally:
            self._waiting -= 1

    async def _book(self, loop: asyncio.AbstractEventLoop) -> _Booked | None:
        """Join this process's line; the booking task books slots for it in FIFO order."""
        future: asyncio.Future[_Booked | None] = loop.create_future()
        self._line.append(future)
        if self._booker is None:
            self._booker = self._spawn(self._run_booker())
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                booked = future.result()
                if booked is not None and booked[1] is not None:
                    self._queue_release(booked[1])
            raise

    async def _run_booker(self) -> None:
        """Book slots for the line, one round trip for up to `_MAX_BATCH` waiters."""
        loop = self._loop
        assert loop is not None
        line = self._line
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
                leases = [self._new_lease_id() for _ in range(want)] if self._held_cap else []
                try:
                    status, waits, retry = await self._call_acquire(want, leases)
                except _REDIS_ERRORS as exc:
                    self._redis_failed(exc)
                    return
                now = loop.time()
                for i, wait in enumerate(waits):
                    lease = leases[i] if leases else None
                    while line and line[0].done():
                        line.popleft()
                    if line:
                        line.popleft().set_result((now + wait, lease, self._pause_until()))
                    elif lease is not None:
                        self._queue_release(lease)  # its waiter was cancelled meanwhile
                if not any(not f.done() for f in line):
                    continue
                if status == "full":
                    await self._wait_for_slot(retry)
                elif retry > 0:
                    await asyncio.sleep(retry)
        except asyncio.CancelledError:
            # Cancelled by aclose() or at loop shutdown: nobody waits forever.
            self._fail_line(lambda: RuntimeError("the RedisRateLimiter was closed while waiting"))
            raise
        except Exception as exc:
            logger.exception("flux_async.redis: the booking task failed")
            failure = f"the RedisRateLimiter failed: {exc!r}"
            self._fail_line(lambda: RuntimeError(failure))
        finally:
            self._booker = None

    def _fail_line(self, error: Callable[[], BaseException]) -> None:
        line = self._line
        while line:
            future = line.popleft()
            if not future.done():
                future.set_exception(error())

    async def _wait_for_slot(self, retry: float) -> None:
        """Every in-flight slot is leased: wait until one of ours is given back, or poll."""
        event = self._slot_freed
        assert event is not None
        event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), min(max(retry, 0.001), _FULL_POLL))

    async def _call_acquire(self, want: int, leases: list[str]) -> tuple[str, list[float], float]:
        """Book up to ``want`` slots: (status, waits in seconds, seconds before asking
        again)."""
        releases, self._to_release = self._to_release, []
        settings = self._settings
        head: list[object] = [
            self._ceiling_arg,
            settings.burst,
            _fmt(settings.horizon),
            want,
            self._ttl_ms,
            settings.max_in_flight or 0,
            _fmt(settings.lease),
        ]
        tail: list[object] = [len(releases), *releases, *leases]
        try:
            reply = await self._call(ACQUIRE, self.keys, head, tail)
        except BaseException:
            self._to_release[:0] = releases  # a lease not given back expires on its own
            raise
        granted = int(reply[9])
        waits = [int(w) / 1e6 for w in reply[12 : 12 + granted]]
        return _text(reply[10]), waits, int(reply[11]) / 1e6

    async def _call(
        self, script: Script, keys: Sequence[str], head: list[object], tail: list[object]
    ) -> Any:
        """Run ``script`` with this process's unreported successes and 429s between
        ``head`` and ``tail``, and take in the answer's header.

        One call at a time per process: the answers then come in the order the scripts
        ran, so the totals in each, minus the last answer's and our own, are exactly what
        the other processes did in between.
        """
        lock, loop = self._lock, self._loop
        assert lock is not None
        assert loop is not None
        async with lock:
            own_s, own_l = self._unreported
            self._unreported = [0, 0]
            try:
                reply = await script.run(self._client, keys, [*head, own_s, own_l, *tail])
            except BaseException:
                self._unreported[0] += own_s  # not counted: report them next time
                self._unreported[1] += own_l
                raise
            self._absorb(reply, own_s, own_l, loop.time())
        return reply

    def _absorb(self, reply: Any, own_s: int, own_l: int, now: float) -> None:
        """Take in an answer's header (see _scripts.py); replay into the controller what
        the other processes did since the last answer."""
        epoch = _text(reply[0])
        rate = float(_text(reply[1]))
        pause_us, g, s, limited, limited_age_us, ver, cuts, granted = (int(x) for x in reply[2:10])
        self._failing = False
        # When the gate opens (or last opened), on this loop's clock: the controller
        # measures send rates only over time the gate was open.
        self._pause_seen = NEVER if pause_us <= _NEVER_US else now + pause_us / 1e6
        if epoch != self._epoch:
            # A new hash (first contact, or Redis lost its data): count from here.
            self._epoch = epoch
            self._ver = ver
            self._cuts = cuts
            self._pause_own = NEVER
            self._rate.rate = None if rate <= 0 else rate
            others = (0, 0, 0)
        else:
            seen_g, seen_s, seen_l = self._seen
            others = (
                max(0, g - seen_g - granted),
                max(0, s - seen_s - own_s),
                max(0, limited - seen_l - own_l),
            )
            if ver >= self._ver:
                self._ver = ver
                self._cuts = cuts
                self._rate.rate = None if rate <= 0 else rate
        self._seen = (g, s, limited)
        if self._adaptive:
            # 429s reported more than a window ago (heard of only now, say after a pause
            # this process slept through) belong to a window that is over: they are no
            # evidence of overload now.
            fresh = 0 <= limited_age_us <= self._controller.window * 1e6
            self._replay(now, granted + others[0], others[1], others[2] if fresh else 0)

    def _replay(self, now: float, grants: int, successes: int, limited: int) -> None:
        """Tell the controller of permits (all), successes and 429s (other processes')."""
        controller = self._controller
        for _ in range(min(grants, _MAX_REPLAY)):
            controller.on_grant(now)
        if successes:

            def clock() -> float:
                return now

            for _ in range(min(successes, _MAX_REPLAY)):
                controller.on_success(clock)
        for _ in range(min(limited, _MAX_REPLAY)):
            controller.on_rate_limited(now, gate_opened=self._pause_until())

    def _pause_until(self) -> float:
        return max(self._pause_seen, self._pause_own)

    # -- feedback ----------------------------------------------------------------------

    def on_success(self) -> None:
        """Report a 2xx: give back the task's in-flight slot; after a calm window the
        controller proposes a growth step to every process."""
        loop = self._bind()
        self._unreported[0] += 1
        if self._held:
            task = asyncio.current_task(loop)
            if task is not None:
                self._release(task)
        if self._mode == "local":
            if self._fallback is not None:
                self._fallback.on_success()
            return
        if self._adaptive:
            self._controller.on_success(loop.time)

    def on_rate_limited(self, retry_after: float | None) -> None:
        """Report a 429: as `RateLimiter.on_rate_limited`, for every process sharing
        ``name`` (the pause goes to Redis at once; other processes see it on their next
        booking, within the horizon)."""
        if retry_after is not None and (
            isinstance(retry_after, bool)
            or not isinstance(retry_after, int | float)
            or not 0 <= retry_after < math.inf
        ):
            raise ValidationError("retry_after", retry_after, "a finite number >= 0, or None")
        loop = self._bind()
        now = loop.time()
        self._rate_limited += 1
        self._unreported[1] += 1
        if self._held:
            task = asyncio.current_task(loop)
            if task is not None:
                self._release(task)
        if self._mode == "local":
            if self._fallback is not None:
                self._fallback.on_rate_limited(retry_after)
            return
        gate_opened = self._pause_until()
        overloaded = not self._adaptive or self._controller.on_rate_limited(
            now, gate_opened=gate_opened
        )
        # The in-process rule (RateLimiter.on_rate_limited): a long Retry-After, or an
        # overload 429 not within a window of the gate opening, pauses everyone.
        window = self._controller.window
        if retry_after and (
            retry_after > window or (overloaded and now - gate_opened + SLACK >= window)
        ):
            self._pause_own = max(self._pause_own, now + retry_after)
            self._pause_for = max(self._pause_for, float(retry_after))
        # The 429 goes to Redis at once (with the pause, and the cut if the controller
        # made one): the other processes' controllers count it within a booking or two.
        self._send_feedback()

    def _propose(self, rate: float | None, cut: bool) -> None:
        """The controller set the rate: propose it to every process (`_SharedRate`)."""
        value = 0.0 if rate is None else rate
        if cut:
            self._proposal = ("cut", value)
        elif self._proposal is None or self._proposal[0] != "cut":
            self._proposal = ("grow", value)
        self._send_feedback()

    def _send_feedback(self) -> None:
        if self._feedback is None and self._loop is not None:
            self._feedback = self._spawn(self._run_feedback())

    async def _run_feedback(self) -> None:
        """Send the pending rate proposal, pause and 429s together, until none is left."""
        settings = self._settings
        try:
            while self._proposal is not None or self._pause_for or self._unreported[1]:
                op, value = self._proposal or ("", 0.0)
                pause_for = self._pause_for
                self._proposal = None
                self._pause_for = 0.0
                if self._mode == "local":
                    return
                head: list[object] = [
                    self._ceiling_arg,
                    settings.burst,
                    _fmt(self._controller.window),
                    self._ttl_ms,
                    op,
                    _fmt(value),
                    _fmt(pause_for),
                ]
                try:
                    await self._call(FEEDBACK, [self._state_key], head, [])
                except _REDIS_ERRORS as exc:
                    self._redis_failed(exc)
                    return
        finally:
            self._feedback = None

    # -- in-flight slots ---------------------------------------------------------------

    @property
    def _held_cap(self) -> bool:
        return self._settings.max_in_flight is not None

    def _new_lease_id(self) -> str:
        self._lease_seq += 1
        return f"{self._tag}:{self._lease_seq}"

    def _hold(self, task: asyncio.Task[Any], hold: _Hold) -> None:
        if task not in self._held:
            task.add_done_callback(self._task_done)
        self._held[task] = hold
        if isinstance(hold, str) and self._heartbeat is None:
            self._heartbeat = self._spawn(self._renew_leases())

    def _release(self, task: asyncio.Task[Any]) -> None:
        hold = self._held.pop(task, None)
        if hold is None:
            return
        task.remove_done_callback(self._task_done)
        if isinstance(hold, str):
            self._queue_release(hold)
        else:
            hold.release()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._release(task)

    def _queue_release(self, lease: str) -> None:
        self._to_release.append(lease)
        if self._slot_freed is not None:
            self._slot_freed.set()
        if self._flusher is None and self._loop is not None and not self._loop.is_closed():
            self._flusher = self._spawn(self._flush_releases())

    async def _flush_releases(self) -> None:
        try:
            while self._to_release:
                batch, self._to_release = self._to_release, []
                try:
                    await self._client.zrem(self._leases_key, *batch)
                except _REDIS_ERRORS as exc:
                    self._redis_errors += 1
                    logger.debug("flux_async.redis: could not give back leases: %r", exc)
                    return  # they expire on their own
        finally:
            self._flusher = None

    async def _renew_leases(self) -> None:
        """Renew this process's leases every third of a lease while it holds any."""
        settings = self._settings
        try:
            while True:
                await asyncio.sleep(settings.lease / 3)
                held = [h for h in self._held.values() if isinstance(h, str)]
                if not held:
                    return
                try:
                    await RENEW.run(
                        self._client,
                        [self._leases_key],
                        [_fmt(settings.lease), self._ttl_ms, *held],
                    )
                except _REDIS_ERRORS as exc:
                    self._redis_errors += 1
                    logger.debug("flux_async.redis: could not renew leases: %r", exc)
        finally:
            self._heartbeat = None

    # -- Redis failing -----------------------------------------------------------------

    def _redis_failed(self, exc: BaseException) -> None:
        self._redis_errors += 1
        settings = self._settings
        if settings.on_redis_error == "local":
            self._enter_local(exc)
            return
        message = (
            f"the shared rate limiter {settings.name!r} could not reach Redis at "
            f"{settings.redis_url} ({type(exc).__name__}: {exc}); no permit was given "
            "(on_redis_error='fail')"
        )
        if not self._failing:
            self._failing = True
            logger.warning("flux_async.redis: %s", message)

        def error() -> RedisLimiterError:
            failure = RedisLimiterError(message, url=settings.redis_url, name=settings.name)
            failure.__cause__ = exc
            return failure

        self._fail_line(error)

    def _enter_local(self, exc: BaseException) -> None:
        if self._mode == "local":
            return
        settings = self._settings
        share = settings.local_share
        assert share is not None
        self._mode = "local"
        self._fallbacks += 1
        base = self._rate.rate if self._rate.rate is not None else self._ceiling
        local_rate = None if base is None else base * share
        self._fallback = RateLimiter(local_rate, **self._local_options)
        if settings.max_in_flight is not None:
            self._fallback_slots = ConcurrencyLimit(
                max(1, math.floor(settings.max_in_flight * share))
            )
        # Leases in Redis are out of reach: forget them (they expire there).
        for task, hold in list(self._held.items()):
            if isinstance(hold, str):
                del self._held[task]
                task.remove_done_callback(self._task_done)
        self._to_release.clear()
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
        line = self._line
        while line:
            future = line.popleft()
            if not future.done():
                future.set_result(None)
        if self._reconnect is None:
            self._reconnect = self._spawn(self._reconnect_loop())

    async def _acquire_local(self, task: asyncio.Task[Any] | None) -> None:
        fallback, slots = self._fallback, self._fallback_slots
        assert fallback is not None
        if slots is not None:
            if not slots.try_acquire():
                await slots.acquire()
            if task is not None:
                self._hold(task, slots)
        try:
            if not fallback.try_acquire():
                await fallback.acquire()
        except BaseException:
            if task is not None:
                self._release(task)
            elif slots is not None:
                slots.release()
            raise

    async def _reconnect_loop(self) -> None:
        """While falling back: ping Redis, backing off, and share again when it answers."""
        delay = _RECONNECT_FIRST
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    await cast(Coroutine[Any, Any, Any], self._client.ping())
                except _REDIS_ERRORS:
                    delay = min(2 * delay, _RECONNECT_MAX)
                    continue
                break
            self._mode = "shared"
            self._fallback = None
            self._fallback_slots = None
            self._epoch = None  # Redis may have lost the state: count afresh
            logger.info(
                "flux_async.redis: Redis at %s answers again; limiter %r shares its quota again",
                self._settings.redis_url,
                self._settings.name,
            )
        finally:
            self._reconnect = None

    # -- the event loop ----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        loop = self._loop
        assert loop is not None
        task = loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return loop
        if self._loop is not None:
            raise RuntimeError(
                "this RedisRateLimiter is bound to another event loop (a redis.asyncio "
                "client belongs to the loop it connected in): await limiter.aclose() "
                "there first, or make one limiter per loop"
            )
        self._loop = loop
        self._slot_freed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._pause_seen = self._pause_own = NEVER
        self._epoch = None
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
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        leases = [h for h in self._held.values() if isinstance(h, str)] + self._to_release
        for task in list(self._held):
            self._held.pop(task)
            task.remove_done_callback(self._task_done)
        self._to_release = []
        if leases and self._mode == "shared":
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._client.zrem(self._leases_key, *leases)
        if self._owns_client:
            await self._client.aclose()
        self._loop = None
        self._mode = "shared"
        self._fallback = None
        self._fallback_slots = None

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
        """Return a snapshot (no Redis call; safe from any thread)."""
        loop = self._loop
        fallback = self._fallback
        rate = self._rate.rate
        if self._mode == "local" and fallback is not None:
            rate = fallback.statistics().rate
        paused_for = 0.0 if loop is None else max(0.0, self._pause_until() - loop.time())
        return RedisLimiterStatistics(
            rate=rate,
            ceiling=self._ceiling,
            burst=self._settings.burst,
            paused_for=paused_for,
            permits=self._permits,
            waiting=self._waiting,
            rate_limited=self._rate_limited,
            cuts=self._cuts,
            mode=self._mode,
            in_flight=len(self._held),
            redis_errors=self._redis_errors,
            fallbacks=self._fallbacks,
        )

    def __repr__(self) -> str:
        stats = self.statistics()
        rate = "unpaced" if stats.rate is None else f"{stats.rate:g}/s"
        ceiling = "none" if stats.ceiling is None else f"{stats.ceiling:g}/s"
        return (
            f"<{type(self).__name__} name={self._settings.name!r} "
            f"redis={self._settings.redis_url} mode={stats.mode} rate={rate} "
            f"ceiling={ceiling} burst={stats.burst} paused_for={stats.paused_for:g}s "
            f"waiting={stats.waiting}>"
        )

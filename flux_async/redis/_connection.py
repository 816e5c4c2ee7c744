"""The Redis client of a `RedisRateLimiter`, and the event loop it is bound to.

A redis.asyncio client belongs to the loop it connected in, so a limiter binds to the
first loop that uses it: its lock, its event and its background tasks live there until
``aclose()`` lets another loop take it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Final, TypeAlias

import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from .._exceptions import ValidationError
from .._timing import check_positive

__all__ = [
    "DEFAULT_REDIS_TIMEOUT",
    "REDIS_ERRORS",
    "Connection",
    "RedisClient",
    "check_client",
    "connect",
    "describe_client",
]

#: Seconds: `from_url` clients give up on a connect or an answer after this long.
DEFAULT_REDIS_TIMEOUT = 2.0

#: The clients a limiter takes: one server, or a cluster (its keys share one slot).
RedisClient: TypeAlias = "redis.asyncio.Redis | RedisCluster"
#: What a Redis call raises when Redis is unreachable or refuses (a timeout included).
REDIS_ERRORS: Final = (redis.exceptions.RedisError, OSError, TimeoutError)


def check_client(client: object) -> None:
    """Raise `ValidationError` unless ``client`` is a redis.asyncio client.

    Example::

        check_client(redis.asyncio.Redis.from_url("redis://localhost"))   # fine
        check_client("redis://localhost")   # ValidationError naming the field "client"
    """
    if not isinstance(client, redis.asyncio.Redis | RedisCluster):
        raise ValidationError(
            "client", client, "a redis.asyncio.Redis or redis.asyncio.RedisCluster"
        )


def connect(url: object, timeout: object) -> redis.asyncio.Redis:
    """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``) that gives up on a
    connect or an answer after ``timeout`` seconds; it connects when first used.

    Example::

        client = connect("redis://:secret@redis:6379/0", DEFAULT_REDIS_TIMEOUT)
    """
    if not isinstance(url, str):
        raise ValidationError("url", url, "a redis://, rediss:// or unix:// URL")
    timeout = check_positive("timeout", timeout)
    try:
        return redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # Two quick retries ride over a connection that went stale (Redis
            # restarted); redis-py's default (10, backing off to 1 s) would hold a
            # waiting permit for seconds before saying Redis is down.
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2),
        )
    except ValueError as exc:
        raise ValidationError("url", url, f"a redis://, rediss:// or unix:// URL ({exc})") from None


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


class Connection:
    """A limiter's client, and the event loop it is bound to with what lives there.

    * ``client``; ``owns_client``: `from_url` made it, so ``aclose()`` closes it;
    * ``loop``: the loop bound to (None until the first use, and after `close`);
    * ``lock``: one Redis call at a time (see `SharedState.call`); ``slot_freed``: set
      when this process gives back a lease (a waiter for a slot need not poll). Both are
      made again in each loop: an asyncio primitive used in one loop fails in another;
    * `spawn`: background tasks, all cancelled by `cancel_tasks`.

    Example::

        conn = Connection(redis.asyncio.Redis.from_url("redis://localhost"))
        loop, fresh = conn.bind()   # in a coroutine; fresh: a new loop, forget old times
        conn.spawn(renew_leases())
        await conn.cancel_tasks()
        await conn.close()
    """

    def __init__(self, client: RedisClient) -> None:
        self.client: RedisClient = client
        self.owns_client = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock: asyncio.Lock | None = None
        self.slot_freed: asyncio.Event | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def usable(self) -> bool:
        """Whether a task may be spawned now (bound to a loop that is not closed)."""
        return self.loop is not None and not self.loop.is_closed()

    def bind(self) -> tuple[asyncio.AbstractEventLoop, bool]:
        """The running loop, and whether it is new to this limiter (so the caller forgets
        every time it recorded: they were on another clock). Raises RuntimeError while
        bound to another loop."""
        loop = asyncio.get_running_loop()
        if loop is self.loop:
            return loop, False
        if self.loop is not None:
            raise RuntimeError(
                "this RedisRateLimiter is bound to another event loop (a redis.asyncio "
                "client belongs to the loop it connected in): await limiter.aclose() "
                "there first, or make one limiter per loop"
            )
        self.loop = loop
        self.slot_freed = asyncio.Event()
        self.lock = asyncio.Lock()
        return loop, True

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a background task of the bound loop."""
        loop = self.loop
        assert loop is not None
        task = loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def cancel_tasks(self) -> None:
        """Cancel every background task and wait until they have ended."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Close the client if `from_url` made it; unbind from the loop."""
        if self.owns_client:
            await self.client.aclose()
        self.loop = None

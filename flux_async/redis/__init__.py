"""One API key's quota shared by many processes and machines, through Redis.

Needs the ``redis`` extra (``pip install 'flux-async[redis]'``); ``import flux_async``
alone never imports redis.

Example::

    from flux_async import FluxClient
    from flux_async.redis import RedisRateLimiter

    limiter = RedisRateLimiter.from_url("redis://redis:6379/0", rate=10, name="images-prod")
    async with limiter, FluxClient(limiter=limiter) as client:
        await client.generate("a lighthouse at dusk")

See the guide "Many workers, one key" (docs/guides/many-processes.md).
"""

try:
    import redis.asyncio  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "flux_async.redis needs the redis package: pip install 'flux-async[redis]'"
    ) from exc

from ._connection import DEFAULT_REDIS_TIMEOUT
from ._fallback import RedisLimiterError
from ._limiter import RedisRateLimiter
from ._settings import DEFAULT_KEY_TTL, DEFAULT_LEASE, DEFAULT_PREFIX, RedisLimiterSettings
from ._stats import RedisLimiterStatistics

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

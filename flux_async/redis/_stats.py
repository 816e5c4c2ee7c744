"""What a `RedisRateLimiter` reports about itself: its counters and their snapshot."""

from __future__ import annotations

from typing import Literal

import attrs

from .._limits import LimiterStatistics
from ._settings import RedisLimiterSettings

__all__ = ["Counters", "RedisLimiterStatistics", "describe"]


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


class Counters:
    """What one limiter counted in this process, for its `RedisLimiterStatistics`.

    * ``permits`` granted, tasks ``waiting`` in ``acquire()`` now, 429s reported
      (``rate_limited``);
    * ``redis_errors``: Redis calls that failed; ``fallbacks``: times it fell back to an
      in-process limiter.

    Example::

        counts = Counters()
        counts.redis_errors += 1
        print(counts)   # <Counters permits=0 waiting=0 rate_limited=0 redis_errors=1 ...>
    """

    __slots__ = ("fallbacks", "permits", "rate_limited", "redis_errors", "waiting")

    def __init__(self) -> None:
        self.permits = 0
        self.waiting = 0
        self.rate_limited = 0
        self.redis_errors = 0
        self.fallbacks = 0

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} permits={self.permits} waiting={self.waiting} "
            f"rate_limited={self.rate_limited} redis_errors={self.redis_errors} "
            f"fallbacks={self.fallbacks}>"
        )


def describe(kind: str, settings: RedisLimiterSettings, stats: RedisLimiterStatistics) -> str:
    """A limiter's repr: its name, its Redis without password, and the gist of ``stats``.

    Example::

        describe("RedisRateLimiter", limiter.settings, limiter.statistics())
        # "<RedisRateLimiter name='images' redis=redis://h:6379/0 mode=shared rate=10/s
        #   ceiling=10/s burst=1 paused_for=0s waiting=0>"
    """
    rate = "unpaced" if stats.rate is None else f"{stats.rate:g}/s"
    ceiling = "none" if stats.ceiling is None else f"{stats.ceiling:g}/s"
    return (
        f"<{kind} name={settings.name!r} "
        f"redis={settings.redis_url} mode={stats.mode} rate={rate} "
        f"ceiling={ceiling} burst={stats.burst} paused_for={stats.paused_for:g}s "
        f"waiting={stats.waiting}>"
    )

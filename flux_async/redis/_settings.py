"""A `RedisRateLimiter`'s settings: checked once, when it is made, and never changed."""

from __future__ import annotations

import hashlib
import math
from typing import Literal, TypeAlias

import attrs

from .._adaptive import AdaptiveController, RateTarget
from .._exceptions import ValidationError
from .._limits import RateLimiter
from .._timing import check_positive
from ._connection import RedisClient, check_client, describe_client
from ._scripts import float_arg

__all__ = [
    "DEFAULT_KEY_TTL",
    "DEFAULT_LEASE",
    "DEFAULT_PREFIX",
    "LimiterConfig",
    "OnRedisError",
    "RedisLimiterSettings",
    "check_settings",
]

#: Every key starts with this (then ``:{<hash of name>}:``).
DEFAULT_PREFIX = "flux-async"
#: Seconds a lease (one in-flight slot, with ``max_in_flight``) lives unless renewed; a
#: process renews its leases every third of this, so only a dead process loses them.
DEFAULT_LEASE = 10.0
#: Seconds: the limiter's keys expire after this long without use.
DEFAULT_KEY_TTL = 3600.0

#: What a limiter does while Redis fails (see `Fallback`).
OnRedisError: TypeAlias = Literal["fail", "local"]


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


def check_settings(
    client: RedisClient,
    *,
    name: str,
    rate: float | None,
    per: float,
    burst: int,
    horizon: float,
    adaptive: bool,
    max_in_flight: int | None,
    lease: float,
    on_redis_error: OnRedisError,
    local_share: float | None,
    prefix: str,
    key_ttl: float,
) -> RedisLimiterSettings:
    """A `RedisRateLimiter`'s settings from its arguments (``rate`` becomes requests per
    second); the first bad one found raises `ValidationError` naming it.

    Example::

        settings = check_settings(client, name="images", rate=600, per=60, ...)
        settings.rate   # 10.0
    """
    check_client(client)
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
        isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1
    ):
        raise ValidationError("max_in_flight", max_in_flight, "an int >= 1, or None")
    lease = check_positive("lease", lease)
    key_ttl = check_positive("key_ttl", key_ttl)
    if key_ttl < lease:
        raise ValidationError("key_ttl", key_ttl, f"seconds >= lease ({lease:g})")
    share = _check_fallback(on_redis_error, local_share)
    return RedisLimiterSettings(
        name=name,
        rate=ceiling,
        burst=burst,
        horizon=horizon,
        adaptive=bool(adaptive),
        max_in_flight=max_in_flight,
        lease=lease,
        on_redis_error=on_redis_error,
        local_share=share,
        prefix=prefix,
        key_ttl=key_ttl,
        redis_url=describe_client(client),
    )


def _check_fallback(on_redis_error: object, local_share: object) -> float | None:
    """``local_share`` as a float: needed with ``on_redis_error="local"``, None with
    ``"fail"``."""
    if on_redis_error not in ("fail", "local"):
        raise ValidationError("on_redis_error", on_redis_error, "'fail' or 'local'")
    if on_redis_error == "fail":
        if local_share is not None:
            raise ValidationError("local_share", local_share, "None unless on_redis_error='local'")
        return None
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
    return float(local_share)


@attrs.frozen(kw_only=True)
class LimiterConfig:
    """All that is fixed about one limiter: its `settings`, its keys, the script arguments
    that never change, and its controller's tuning (which the controller checks).

    Example::

        config = LimiterConfig.make(client, name="images", rate=10, ...)
        config.keys                          # (state hash, leases sorted set)
        controller = config.controller(shared_rate)
        fallback = config.local_limiter(5.0)  # an in-process RateLimiter, same tuning
    """

    settings: RedisLimiterSettings
    state_key: str
    leases_key: str
    # Script arguments that never change, formatted once: the ceiling (0: none) and the
    # keys' TTL in milliseconds.
    ceiling_arg: str
    ttl_ms: str
    decrease_factor: float
    window: float
    increase: float | None
    min_rate: float
    tolerance: float

    @classmethod
    def make(
        cls,
        client: RedisClient,
        *,
        name: str,
        rate: float | None,
        per: float,
        burst: int,
        adaptive: bool,
        max_in_flight: int | None,
        lease: float,
        on_redis_error: OnRedisError,
        local_share: float | None,
        prefix: str,
        horizon: float,
        key_ttl: float,
        decrease_factor: float,
        window: float,
        increase: float | None,
        min_rate: float,
        tolerance: float,
    ) -> LimiterConfig:
        """The config of a `RedisRateLimiter`'s arguments (see `check_settings`)."""
        settings = check_settings(
            client,
            name=name,
            rate=rate,
            per=per,
            burst=burst,
            horizon=horizon,
            adaptive=adaptive,
            max_in_flight=max_in_flight,
            lease=lease,
            on_redis_error=on_redis_error,
            local_share=local_share,
            prefix=prefix,
            key_ttl=key_ttl,
        )
        # The name itself (which should not be an API key anyway) is never stored; the
        # hash tag keeps both keys in one Redis Cluster slot.
        digest = hashlib.sha256(name.encode()).hexdigest()[:24]
        return cls(
            settings=settings,
            state_key=f"{prefix}:{{{digest}}}:state",
            leases_key=f"{prefix}:{{{digest}}}:leases",
            ceiling_arg=float_arg(settings.rate or 0.0),
            ttl_ms=str(math.ceil(settings.key_ttl * 1000)),
            decrease_factor=decrease_factor,
            window=window,
            increase=increase,
            min_rate=min_rate,
            tolerance=tolerance,
        )

    @property
    def keys(self) -> tuple[str, str]:
        """(state hash, leases sorted set)."""
        return (self.state_key, self.leases_key)

    def controller(self, target: RateTarget) -> AdaptiveController:
        """An `AdaptiveController` with this tuning, driving ``target``."""
        return AdaptiveController(
            target,
            ceiling=self.settings.rate,
            decrease_factor=self.decrease_factor,
            window=self.window,
            increase=self.increase,
            min_rate=self.min_rate,
            tolerance=self.tolerance,
        )

    def local_limiter(self, rate: float | None) -> RateLimiter:
        """An in-process `RateLimiter` at ``rate`` (req/s), otherwise set up as this one."""
        settings = self.settings
        return RateLimiter(
            rate,
            burst=settings.burst,
            adaptive=settings.adaptive,
            decrease_factor=self.decrease_factor,
            window=self.window,
            increase=self.increase,
            min_rate=self.min_rate,
            horizon=settings.horizon,
            tolerance=self.tolerance,
        )

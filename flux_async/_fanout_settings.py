"""A fan-out's arguments, checked before anything is sent and resolved against its
client into one `FanoutSettings` (`fanout_settings`). What each argument means is in
``docs/guides/bulk.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

import attrs

from ._config import Timeout, check_seconds, check_timeout, is_finite_positive
from ._exceptions import ValidationError
from ._fanout_results import FanoutStatistics
from ._fanout_save import SaveTo, save_settings
from ._limits import Limiter, RateLimiter
from ._models import ImageRequest
from ._retry import RetryPolicy, call_policy
from ._save import Downloader
from ._transport import AiohttpTransport, AsyncTransport

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_STOP_ON",
    "FanoutClient",
    "FanoutSettings",
    "check_stop_on",
    "fanout_settings",
]

#: Attempts on the wire at once when the caller does not say.
DEFAULT_CONCURRENCY = 16

#: The answers that stop a fan-out: every other prompt would get them too (a wrong or
#: missing key, a key without access, a wrong base_url or model).
DEFAULT_STOP_ON: frozenset[int] = frozenset({401, 403, 404})


class FanoutClient(Protocol):
    """What a fan-out's settings take from its client: a `FluxClient`.

    Example::

        settings = fanout_settings(client, concurrency=16, ...)
    """

    @property
    def model(self) -> str: ...
    @property
    def retry(self) -> RetryPolicy: ...
    @property
    def timeout(self) -> Timeout: ...
    @property
    def limiter(self) -> Limiter: ...
    @property
    def transport(self) -> AsyncTransport: ...
    @property
    def downloader(self) -> Downloader: ...
    def build_request(
        self, prompt: str | ImageRequest, fields: Mapping[str, Any] | None = None
    ) -> ImageRequest: ...


@attrs.frozen(kw_only=True)
class FanoutSettings:
    """How one fan-out runs: the arguments of `FluxClient.iter_generate`, checked and
    resolved (the limiter and policy to use, the batch's fields with the model filled in).

    Example::

        FanoutSettings(concurrency=16, limiter=client.limiter, policy=RetryPolicy(),
                       timeout=DEFAULT_TIMEOUT, fields={"model": "flux-kontext-pro"},
                       fail_fast=False, batch_deadline=None, on_progress=None)
    """

    concurrency: int
    limiter: Limiter
    policy: RetryPolicy
    timeout: Timeout
    fields: Mapping[str, Any]
    fail_fast: bool
    batch_deadline: float | None
    on_progress: Callable[[FanoutStatistics], None] | None
    save: SaveTo | None = None
    stop_on: frozenset[int] = DEFAULT_STOP_ON


def fanout_settings(
    client: FanoutClient,
    *,
    concurrency: int,
    rate_limit: float | None,
    per: float,
    burst: int,
    limiter: Limiter | None,
    retry: RetryPolicy | None,
    deadline: float | None,
    batch_deadline: float | None,
    timeout: Timeout | None,
    fail_fast: bool,
    on_progress: Callable[[FanoutStatistics], None] | None,
    save_to: object,
    save_stem: object,
    stop_on: Collection[int],
    fields: Mapping[str, Any],
) -> FanoutSettings:
    """Check the arguments of `FluxClient.iter_generate` (a `ValidationError` naming the
    first bad one) and resolve them against ``client``.

    Example::

        settings = fanout_settings(client, concurrency=16, rate_limit=50, per=1.0, ...)
    """
    transport = client.transport
    pool = transport.max_connections if isinstance(transport, AiohttpTransport) else None
    _check_run(concurrency, deadline, batch_deadline, timeout, fail_fast, on_progress)
    own_limiter = _own_limiter(concurrency, rate_limit, per, burst, limiter, pool)
    stop_statuses = check_stop_on(stop_on)
    policy = call_policy(client.retry, retry, deadline)
    call_timeout = client.timeout if timeout is None else timeout
    downloader = client.downloader.with_policy(policy, call_timeout)
    save = save_settings(save_to, save_stem, downloader, concurrency=concurrency, pool=pool)
    # Batch-wide fields are checked once, now, not once per prompt later.
    client.build_request("check", fields)
    return FanoutSettings(
        concurrency=concurrency,
        limiter=client.limiter if own_limiter is None else own_limiter,
        policy=policy,
        timeout=call_timeout,
        fields={"model": client.model, **fields},
        fail_fast=fail_fast,
        batch_deadline=batch_deadline,
        on_progress=on_progress,
        save=save,
        stop_on=stop_statuses,
    )


def check_stop_on(stop_on: object) -> frozenset[int]:
    """``stop_on`` as a set of statuses; `ValidationError` unless it is a collection of
    HTTP error statuses (400-599).

    Example::

        check_stop_on({401, 403})  # frozenset({401, 403})
        check_stop_on(())          # never stop
    """
    allowed = (
        "a collection of HTTP error statuses (400-599) that stop the batch, such as "
        "{401, 403, 404} (the default); () never stops"
    )
    if isinstance(stop_on, str | bytes) or not isinstance(stop_on, Collection):
        raise ValidationError("stop_on", stop_on, allowed)
    statuses = frozenset(stop_on)
    for status in statuses:
        if type(status) is not int or not 400 <= status <= 599:
            raise ValidationError("stop_on", stop_on, allowed)
    return statuses


def _check_run(
    concurrency: object,
    deadline: object,
    batch_deadline: object,
    timeout: object,
    fail_fast: object,
    on_progress: object,
) -> None:
    """The settings of the run itself, each of the right type."""
    if type(concurrency) is not int or concurrency < 1:
        raise ValidationError("concurrency", concurrency, "an integer >= 1")
    check_seconds("deadline", deadline)
    check_seconds("batch_deadline", batch_deadline)
    check_timeout(timeout)
    if type(fail_fast) is not bool:
        raise ValidationError("fail_fast", fail_fast, "True or False")
    if on_progress is not None and not callable(on_progress):
        raise ValidationError(
            "on_progress", on_progress, "a function taking a FanoutStatistics, or None"
        )


def _own_limiter(
    concurrency: int,
    rate_limit: float | None,
    per: float,
    burst: int,
    limiter: Limiter | None,
    pool: int | None,
) -> Limiter | None:
    """The limiter the fan-out asks for: a new `RateLimiter` for ``rate_limit``, the
    caller's ``limiter``, or None (the client's own). ``pool`` is the client's connection
    pool size, when it has one."""
    if limiter is not None and not isinstance(limiter, Limiter):
        raise ValidationError("limiter", limiter, "a flux_async.Limiter, or None")
    if rate_limit is None:
        # Without a rate they would silently do nothing.
        for name, value, default in (("per", per, 1.0), ("burst", burst, 1)):
            if value != default:
                raise ValidationError(
                    name,
                    value,
                    f"the default ({default}) unless rate_limit is given: per and burst "
                    "need rate_limit (a limiter of your own sets its own)",
                )
    if pool and pool < concurrency:
        # Attempts beyond the pool would queue for a connection inside aiohttp, where
        # the wait counts against Timeout.connect and fails as a timeout.
        raise ValidationError(
            "concurrency",
            concurrency,
            f"at most the client's max_connections ({pool}); "
            f"create the client with FluxClient(max_connections={concurrency}) or more",
        )
    if limiter is not None and rate_limit is not None:
        raise ValidationError(
            "rate_limit", rate_limit, "None when a limiter is given (set its rate instead)"
        )
    if rate_limit is not None:
        if not is_finite_positive(rate_limit):
            raise ValidationError(
                "rate_limit", rate_limit, "a finite number of requests per `per` seconds, > 0"
            )
        limiter = RateLimiter(rate_limit, per=per, burst=burst)
    return limiter

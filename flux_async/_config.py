"""Settings shared by the client and its transports: the per-attempt `Timeout`."""

from __future__ import annotations

import math
from typing import Any

import attrs

from ._exceptions import ValidationError

__all__ = [
    "DEFAULT_TIMEOUT",
    "DOWNLOAD_READ_TIMEOUT",
    "Timeout",
    "check_seconds",
    "check_timeout",
    "is_finite_positive",
]


def is_finite_positive(value: object) -> bool:
    """A finite number > 0 (seconds, a rate); a bool is not a number here."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:
        # An int too large for a float: no clock can time it.
        return False


def check_seconds(field: str, value: object) -> None:
    """Raise `ValidationError` unless ``value`` is None or finite seconds > 0."""
    if value is not None and not is_finite_positive(value):
        raise ValidationError(field, value, "a finite number of seconds > 0, or None for none")


def _optional_positive(name: str) -> Any:
    def check(_: object, __: object, value: object) -> None:
        check_seconds(name, value)

    return check


def check_timeout(value: object, *, optional: bool = True) -> None:
    """``timeout`` is a `Timeout` (or None per call); a bare number is the usual slip."""
    if isinstance(value, Timeout) or (optional and value is None):
        return
    example = f"Timeout(total={value!r})" if is_finite_positive(value) else "Timeout(total=60)"
    allowed = "a flux_async.Timeout or None" if optional else "a flux_async.Timeout"
    raise ValidationError("timeout", value, f"{allowed}; pass {example}")


@attrs.frozen(kw_only=True)
class Timeout:
    """Time limits for one HTTP attempt (the whole call's limit is the retry deadline).

    ``connect`` (10 s) bounds getting a connection; ``total`` (300 s) bounds one attempt
    from send to the last byte: image models take seconds to minutes, so it is generous.
    ``read`` bounds each wait for more of the answer (its headers included): none for an
    API call, whose server sends nothing until the image is made, but an image download
    whose server stops sending for `DOWNLOAD_READ_TIMEOUT` (30 s) fails that attempt
    rather than hold its prompt until ``total``. ``None`` disables a limit. Each must be
    a finite number of seconds > 0 or ``None``; anything else raises `ValidationError`.

    Example::

        client = FluxClient(timeout=Timeout(connect=5, total=600))
        await client.generate("x", timeout=Timeout(total=30))
        client.downloader.with_policy(client.retry, Timeout(read=10))  # stalls: 10 s
    """

    connect: float | None = attrs.field(default=10.0, validator=_optional_positive("connect"))
    total: float | None = attrs.field(default=300.0, validator=_optional_positive("total"))
    read: float | None = attrs.field(default=None, validator=_optional_positive("read"))


DEFAULT_TIMEOUT = Timeout()

#: An image download's ``Timeout.read`` when its client's timeout sets none: a CDN that
#: sends nothing for this long has stalled (a real image arrives in well under a second).
DOWNLOAD_READ_TIMEOUT = 30.0

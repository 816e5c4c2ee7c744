"""The server's request quota, as OpenAI states it in ``x-ratelimit-*-requests`` headers:
reading the headers (`parse_quota`) and the refill rate they imply (`ServerRate`).

An adaptive limiter learns the server's pace from these rather than from a burst of 429s
(`Limiter.on_quota`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

__all__ = [
    "LIMIT_HEADER",
    "REMAINING_HEADER",
    "RESET_HEADER",
    "ServerRate",
    "parse_quota",
]

#: Seconds a learnt server rate is trusted as a bound before a fresh reading replaces it.
_QUOTA_MEMORY = 10.0
#: The request quota headers of OpenAI and the gateways that copy it.
LIMIT_HEADER = "x-ratelimit-limit-requests"
REMAINING_HEADER = "x-ratelimit-remaining-requests"
RESET_HEADER = "x-ratelimit-reset-requests"
# "1s", "6m0s", "20ms", "1h2m3.5s" (Go durations, as OpenAI sends them) or plain seconds.
_DURATION = re.compile(
    r"(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)s)?(?:(?P<ms>\d+(?:\.\d+)?)ms)?"
)


def parse_quota(headers: Mapping[str, str]) -> tuple[int, int, float] | None:
    """``(limit, remaining, reset seconds)`` from a response's ``x-ratelimit-*-requests``
    headers; None when they are missing or make no sense (never raises).

    Example::

        parse_quota({"x-ratelimit-limit-requests": "60",
                     "x-ratelimit-remaining-requests": "59",
                     "x-ratelimit-reset-requests": "1s"})   # (60, 59, 1.0)
    """
    try:
        limit = int(headers[LIMIT_HEADER])
        remaining = int(headers[REMAINING_HEADER])
        text = headers[RESET_HEADER].strip()
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    try:
        reset = float(text)
    except ValueError:
        match = _DURATION.fullmatch(text)
        if match is None or not text:
            return None
        parts = match.groupdict()
        reset = (
            3600 * float(parts["h"] or 0)
            + 60 * float(parts["m"] or 0)
            + float(parts["s"] or 0)
            + float(parts["ms"] or 0) / 1000
        )
    if limit < 1 or not 0 <= remaining <= limit or not 0 <= reset < math.inf:
        return None
    return limit, remaining, reset


class ServerRate:
    """The server's refill rate, read off its quota headers: the requests used up,
    ``limit - remaining``, come back within ``reset`` seconds.

    The headers count whole requests, so the true rate lies between ``(used - 1) / reset``
    and ``used / reset``. The upper end never holds a limiter below what the server
    serves (a 429 or two find the rest); the lowest upper end of recent answers is the
    tightest, and it is forgotten after a while in case the server's quota grew. Only a
    bucket at least half spent is read: there the error is at most a request in ``used``.

    Example::

        server = ServerRate()
        server.read(20, 19, 0.01, now=0.0)   # None: one request used tells no rate
        server.read(20, 0, 0.2, now=0.1)     # 100.0: 20 requests back in 0.2 s
        server.read(20, 10, 0.2, now=0.2)    # 50.0: tighter, so it is kept
    """

    __slots__ = ("_at", "_rate")

    def __init__(self) -> None:
        self._rate: float | None = None
        self._at = -math.inf  # when `_rate` was last set

    def read(self, limit: int, remaining: int, reset: float, now: float) -> float | None:
        """The rate to trust after this reading at ``now``; None while none is known."""
        used = limit - remaining
        if 2 * used >= limit:
            estimate = used / reset
            if self._rate is None or estimate < self._rate or now - self._at > _QUOTA_MEMORY:
                self._rate = estimate
                self._at = now
        return self._rate

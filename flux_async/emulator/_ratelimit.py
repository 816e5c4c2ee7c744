"""The rate model: a per-key GCRA (generic cell rate algorithm) limiter, and its 429 answer.

GCRA keeps one float per key, the theoretical arrival time (TAT) of the next request at the
sustained rate, and needs no background refill task: a request at ``now`` is admitted when
``TAT - tolerance <= now``, where the tolerance lets ``burst`` requests through at once.
"""

from __future__ import annotations

import math

from aiohttp import web

from ._wire import error_json, json_response

__all__ = ["Gcra", "quota_headers", "rate_limited"]


class Gcra:
    """Admit at most ``rate`` requests/second per key, with bursts of up to ``burst``.

    Example::

        limiter = Gcra(rate=5.0, burst=2)
        assert limiter.acquire("key-1", now=0.0) == 0.0  # admitted
    """

    __slots__ = ("_interval", "_tat", "_tolerance")

    def __init__(self, rate: float, burst: int) -> None:
        self._interval = 1.0 / rate
        self._tolerance = self._interval * (burst - 1)
        self._tat: dict[str, float] = {}

    def acquire(self, key: str, now: float) -> float:
        """Take a permit and return 0.0, or return the seconds until one is available.

        A rejected request takes nothing, so a client that waits the returned time gets in.
        """
        tat = self._tat.get(key, now)
        if tat < now:
            tat = now
        wait = tat - self._tolerance - now
        if wait > 0.0:
            return wait
        self._tat[key] = tat + self._interval
        return 0.0

    def quota(self, key: str, now: float) -> tuple[int, float]:
        """``(remaining, reset)``: requests admissible back to back now, and the seconds
        until the full burst is back (what the ``x-ratelimit-*`` headers report).

        Example::

            limiter.quota("key-1", now=0.0)   # (2, 0.0) for a fresh key with burst 2
        """
        tat = self._tat.get(key, now)
        if tat < now:
            tat = now
        # One request now, and one more per interval of the tolerance left.
        left = (now + self._tolerance - tat) / self._interval
        remaining = 0 if left < 0 else int(left + 1e-9) + 1
        return remaining, tat - now

    def clear(self) -> None:
        """Forget every key: all start with a full burst again."""
        self._tat.clear()


def quota_headers(limit: int, remaining: int, reset: float) -> dict[str, str]:
    """The ``x-ratelimit-*-requests`` headers OpenAI sends: the burst, what is left of it
    now, and when it is all back (a Go-style duration, like ``"20ms"`` or ``"1.5s"``).

    Example::

        quota_headers(20, 19, 0.01)   # {..., "x-ratelimit-reset-requests": "10ms"}
    """
    ms = max(0, math.ceil(reset * 1000.0))
    text = f"{ms}ms" if ms < 1000 else f"{ms / 1000:g}s"
    return {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": text,
    }


def rate_limited(
    kid: str, wait: float, limits: tuple[float, int], request_id: str, reset: float = 0.0
) -> web.Response:
    """The 429 for a request ``wait`` seconds early, with ``retry-after-ms``, ``Retry-After``
    and the ``x-ratelimit-*`` headers (nothing left; all back in ``reset`` seconds).

    ``limits`` is ``(rate, burst)``; the message names the key by its id, never the key.
    """
    wait_ms = max(1, math.ceil(wait * 1000.0))
    message = (
        f"Rate limit reached for requests on {kid}: limit {limits[0]:g}/s "
        f"(burst {limits[1]}). Please try again in {wait_ms}ms."
    )
    error = error_json(message, "requests", None, "rate_limit_exceeded")
    headers = {"retry-after-ms": str(wait_ms), "Retry-After": str(max(1, math.ceil(wait)))}
    headers.update(quota_headers(limits[1], 0, reset))
    return json_response(429, error, request_id, headers)

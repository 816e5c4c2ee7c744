"""Live counts a fan-out shares with the calls it makes (plain attribute bumps)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Counters"]


def _ignore(_: int) -> None:
    pass


class Counters:
    """What a running fan-out has seen so far; its calls bump the fields in place.

    ``on_backoff(+1 / -1)`` is called around each backoff sleep, so the fan-out can put
    another worker on the wire while one sleeps. ``halted``
    is set once the fan-out has stopped on a fatal answer: no call sends after that.

    Example::

        counters = Counters()
        counters.in_flight += 1
    """

    __slots__ = (
        "done",
        "failed",
        "halted",
        "in_flight",
        "on_backoff",
        "rate_limited",
        "retries",
    )

    def __init__(self, on_backoff: Callable[[int], None] | None = None) -> None:
        self.in_flight = 0
        self.done = 0
        self.failed = 0
        self.retries = 0
        self.rate_limited = 0
        self.on_backoff = _ignore if on_backoff is None else on_backoff
        #: Set when the fan-out has stopped (``stop_on``): called with the attempts a call
        #: has sent, it gives the error that call ends with instead of sending again.
        self.halted: Callable[[int], BaseException] | None = None

"""What the limiter's parts share: the clock's slack, "never", and the check every rate and
duration goes through."""

from __future__ import annotations

import math
import time

from ._exceptions import ValidationError

__all__ = ["NEVER", "SLACK", "check_positive", "check_retry_after"]

# A deadline closer than this counts as reached. asyncio runs a timer up to one clock tick
# early (BaseEventLoop uses the same resolution), and float sums miss by an ulp
# (0.1 + 0.2 > 0.3, 3.05 - 2.05 < 1.0): without the slack a waiter would wake a hair early
# and sleep again for 1e-17 s, and a window would not count as over when it is.
SLACK = max(1e-9, time.get_clock_info("monotonic").resolution)
# The time of an event that has not happened: earlier than any clock reading, so "a window
# since then" is always over and `max(t, NEVER)` is `t`.
NEVER = -math.inf


def check_positive(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number > 0; raise ValidationError if not.

    Example::

        window = check_positive("window", 1)   # 1.0
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValidationError(name, value, "a finite number > 0")
    return float(value)


def check_retry_after(value: float | None) -> float | None:
    """Return a 429's ``retry_after`` if it is None or a finite number >= 0; raise
    ValidationError if not.

    Example::

        check_retry_after(1.5)   # 1.5
    """
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf
    ):
        raise ValidationError("retry_after", value, "a finite number >= 0, or None")
    return value

"""The start ramp: how many permits a fresh, unpaced limiter grants before it knows better.

A fresh adaptive limiter with no ceiling knows nothing of the server. Granting every
permit at once answers a web app's first traffic spike (200 calls together) with a burst
of 429s from any server whose bucket is smaller than the spike: one wave of rejections
before the first answer can say anything. The ramp is TCP's slow start: ``window``
permits go at once, and the allowance then doubles every ``doubling`` seconds and grows
by two for every success, whichever is more.

* A rate-limited server answers its first 429 (which comes back at once) when the
  allowance first exceeds what it accepts; the 429 and its ``x-ratelimit-*`` headers set
  a pace, and pacing ends the ramp.
* An unlimited server costs a spike at most ``doubling * log2(spike / window)`` seconds
  on its last calls (0.2 s for 200 calls), once per limiter; a fast one costs nothing,
  since its answers open the allowance faster than the clock does.

Like `Pacer`, it takes the time as a number and never waits.
"""

from __future__ import annotations

import math

from ._timing import NEVER

__all__ = ["DEFAULT_DOUBLING", "DEFAULT_START_WINDOW", "StartRamp"]

#: Permits a fresh limiter grants at once: below any spike worth the name, and still at
#: or below the burst of the strictest gateways we have seen (20).
DEFAULT_START_WINDOW = 16
#: Seconds per doubling of the allowance: a 429 on loopback or a LAN comes back well
#: within it, so at most about one doubling's worth is sent into a full bucket.
DEFAULT_DOUBLING = 0.05
# An allowance this large no longer holds anything back that a spike would send.
_END = 4096


class StartRamp:
    """How many permits a fresh limiter may have granted by a given time.

    Example::

        ramp = StartRamp(window=2, doubling=0.1)
        [ramp.take(0.0) for _ in range(3)]   # [True, True, False]: the window is spent
        ramp.due_at(0.0)                     # 0.0585: 3 permits are allowed at 2 * 2**(t/0.1)
        ramp.on_success()                    # two more for each answer that went well
        ramp.take(0.0)                       # True
    """

    __slots__ = ("_began", "_doubling", "_granted", "_successes", "_window", "done")

    def __init__(
        self, *, window: int = DEFAULT_START_WINDOW, doubling: float = DEFAULT_DOUBLING
    ) -> None:
        self._window = window
        self._doubling = doubling
        self._began = NEVER  # the first permit's time
        self._granted = 0
        self._successes = 0
        self.done = False  # set by `take` once the allowance holds nothing back

    def _allowance(self, now: float) -> float:
        grown = self._window * math.exp2(min((now - self._began) / self._doubling, 64.0))
        return grown + 2 * self._successes

    def take(self, now: float) -> bool:
        """Grant one permit at ``now`` if the allowance has room; False otherwise."""
        if self._began == NEVER:
            self._began = now
        allowance = self._allowance(now)
        if allowance >= _END:
            self.done = True  # the caller drops the ramp: one allowance per permit, not two
        # The tolerance makes `due_at`'s time enough despite rounding in log2 and exp2.
        if self._granted + 1 <= allowance + 1e-9:
            self._granted += 1
            return True
        return False

    def on_success(self) -> None:
        """Count an answer that went well: it widens the allowance by two."""
        self._successes += 1

    def due_at(self, now: float) -> float:
        """When the clock alone lets the next permit go (successes may let it go sooner)."""
        if self._began == NEVER:
            return now
        needed = (self._granted + 1 - 2 * self._successes) / self._window
        if needed <= 1:
            return now
        return self._began + self._doubling * math.log2(needed)

    def finished(self, now: float) -> bool:
        """Whether the allowance is past anything a spike would send: the ramp is over."""
        return self._began != NEVER and self._allowance(now) >= _END

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} window={self._window} doubling={self._doubling:g}s"
            f" granted={self._granted} successes={self._successes}>"
        )

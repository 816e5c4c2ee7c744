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
* Only time in which the event loop could run counts. A loop that wakes late (a blocking
  call, a descheduled process) has read no answer meanwhile: counted, a stall of 0.3 s
  would have grown the allowance 64-fold and let a whole spike into a full bucket at once.

Like `Pacer`, it takes the time as a number and never waits.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from ._timing import NEVER

__all__ = ["DEFAULT_DOUBLING", "DEFAULT_START_WINDOW", "RampLine", "StartRamp"]

#: Permits a fresh limiter grants at once: below any spike worth the name, and still at
#: or below the burst of the strictest gateways we have seen (20).
DEFAULT_START_WINDOW = 16
#: Seconds per doubling of the allowance: a 429 on loopback or a LAN comes back well
#: within it, so at most about one doubling's worth is sent into a full bucket.
DEFAULT_DOUBLING = 0.05
# How late a timer may fire before the lateness is taken for a stall of the loop: above
# the millisecond the selector rounds its timeouts up to. At 10 ms, the scheduler's
# slices on 2 CPUs shared by 4 busy processes still grew the allowance unseen (a 200-call
# spike against 100/s burst 20 drew 5-52 429s in 16 runs; at 2 ms, 2-21).
_LATE = 0.002
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

    def discount(self, seconds: float) -> None:
        """Leave ``seconds`` out of the clock's share (time the event loop could not run)."""
        if self._began != NEVER:
            self._began += seconds

    def give_back(self) -> None:
        """Return a permit `take` granted but nobody used (its task was cancelled)."""
        self._granted -= 1

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


class RampLine:
    """The tasks a `StartRamp` holds back, let go together as soon as it has room.

    A success widens the allowance by two, and the answers of a fast server arrive many at
    a time. Letting the waiters go one per turn of the event loop (a lock's hand-off)
    would spread them out for good: each later answer would then arrive alone, and every
    request pay a turn of the loop (one ``epoll`` call, one wake-up of the server) of its
    own. `release` lets every waiter the allowance has room for go in the same turn, first
    come first served, and arms one timer for when the clock next makes room.

    Example::

        line = RampLine()
        if line.holds(loop.time(), paced=False):
            if await line.wait(loop):   # True: a permit; False: the ramp is over
                ...
        line.on_success(loop.time())    # may let the next waiters go
    """

    __slots__ = ("_due", "_loop", "_timer", "_waiters", "over", "ramp")

    def __init__(self) -> None:
        self.ramp = StartRamp()
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._due = math.inf  # when the armed timer is due
        self._loop: asyncio.AbstractEventLoop | None = None
        self.over = False  # set by `end`: the limiter drops the line

    def holds(self, now: float, *, paced: bool) -> bool:
        """Whether a newcomer must wait (else it has a permit): it waits behind anyone
        waiting, or for room. Once ``paced`` (pacing began) the ramp is `over`."""
        if paced:
            self.end()
            return False
        held = bool(self._waiters) or not self.ramp.take(now)
        if self.ramp.done:  # the allowance outgrew any spike
            self.end()
        return held

    async def wait(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Wait for a permit: True once granted, False if the ramp ended (`end`) first."""
        self._loop = loop
        future: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(future)
        self.release(loop.time())
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result():
                # Granted, but the task was cancelled before it could use it.
                self.ramp.give_back()
                self.release(loop.time())
            raise

    def on_success(self, now: float) -> None:
        """Count a success (two more permits) and let the waiters it makes room for go."""
        self.ramp.on_success()
        if self._waiters:
            self.release(now)

    def release(self, now: float) -> None:
        """Let go, in order, every waiter the allowance has room for at ``now``."""
        waiters, ramp = self._waiters, self.ramp
        late = now - self._due
        if late > _LATE:  # the loop stalled past the timer: no answer was read meanwhile
            ramp.discount(late - _LATE)
            self._due = now
        while waiters:
            head = waiters[0]
            if head.done():  # cancelled while it waited
                waiters.popleft()
                continue
            if not ramp.take(now):
                self._arm(ramp.due_at(now))
                return
            waiters.popleft().set_result(True)
        self._disarm()

    def end(self) -> None:
        """The ramp no longer applies (pacing began): send every waiter the normal way."""
        self.over = True
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(False)
        self._disarm()

    def _arm(self, when: float) -> None:
        timer, loop = self._timer, self._loop
        if loop is None or (timer is not None and timer.when() == when):
            return
        if timer is not None:
            timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)
        self._due = when

    def _on_timer(self) -> None:
        self._timer = None
        loop = self._loop
        if loop is not None:
            self.release(loop.time())

    def _disarm(self) -> None:
        self._due = math.inf
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} waiting={len(self._waiters)} {self.ramp!r}>"

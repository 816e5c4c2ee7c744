"""Rate control: the pause gate, GCRA pacing, the adaptive throttle, and a concurrency cap.

Every attempt passes through here (``docs/design.md``, "The path of one prompt")::

    ConcurrencyLimit            take an in-flight slot
    Limiter.acquire()           wait while the pause gate is shut (a 429's Retry-After),
                                then take a pacing permit (GCRA, no startup burst, booked
                                at most ``horizon`` seconds ahead)
    ... POST ...
    Limiter.on_success()        not a 429: after a calm window, the rate grows additively
    Limiter.on_rate_limited()   a 429: shut the gate, cut the rate (at most once a window)

`Limiter` is the interface the client and the fan-out talk to; `RateLimiter` is the
in-process implementation (a Redis one will share one API key's quota across processes).

Pacing is GCRA, the "virtual scheduling" form of a leaky bucket. One number, ``tat`` (the
theoretical arrival time), is the time the next permit would be due if requests came at
exactly ``rate``. With interval ``T = 1/rate`` and burst tolerance ``tau = (burst-1) * T``
a permit may go at ``tat - tau``; taking it moves ``tat`` on by ``T``. Waiters do not poll:
each books its slot and sleeps until exactly then, so N permits take (N-1)/rate seconds
however late the event loop wakes anyone.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import math
import time

import attrs

from ._exceptions import ValidationError

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_DECREASE_FACTOR",
    "DEFAULT_HORIZON",
    "DEFAULT_INCREASE_SHARE_OF_CEILING",
    "DEFAULT_INCREASE_SHARE_OF_CUT",
    "DEFAULT_MIN_INCREASE",
    "DEFAULT_MIN_RATE",
    "DEFAULT_PER",
    "DEFAULT_PROBE_GROWTH",
    "DEFAULT_TOLERANCE",
    "DEFAULT_WINDOW",
    "ConcurrencyLimit",
    "Limiter",
    "LimiterStatistics",
    "RateLimiter",
]

#: ``rate`` counts requests per this many seconds (60.0 makes it a per-minute rate).
DEFAULT_PER = 1.0
#: Permits that may go back to back after an idle spell (1: strictly paced).
DEFAULT_BURST = 1
#: A cut sets the rate to this share of min(current rate, measured send rate). The first
#: design proposed 0.7; against a 40 rps server that spent most of the run climbing back
#: (goodput 0.82 of capacity, benchmarks/bench_storm.py) where 0.9 keeps 0.95 for a few
#: more 429s, which cost the server nothing.
DEFAULT_DECREASE_FACTOR = 0.9
#: Seconds: at most one cut per window; the send rate is measured over one window; the rate
#: grows once per window without a 429.
DEFAULT_WINDOW = 1.0
#: Requests per second: no cut goes below this (nor above the ceiling, if that is lower).
DEFAULT_MIN_RATE = 0.1
#: Seconds: no permit is booked further ahead than this, so cuts reach queued waiters.
#: The first design said ~1 s; permits booked before a cut keep the old pace for up to this
#: long, which at 1 s drew a second of 429s after every cut in the storm benchmark.
DEFAULT_HORIZON = 0.25
#: Default growth per window with a ceiling: this share of the ceiling...
DEFAULT_INCREASE_SHARE_OF_CEILING = 0.05
#: ...and without one: this share of the rate the last cut set...
DEFAULT_INCREASE_SHARE_OF_CUT = 0.10
#: ...and never less than this many requests per second.
DEFAULT_MIN_INCREASE = 0.5
#: After the first cut of an unpaced limiter the measured rate is a guess (one window of
#: sends that began a moment ago), so until the next 429 the rate grows by this factor
#: per window instead of by the additive step: it finds the server's capacity in a few
#: windows, then settles into additive increase like everyone else.
DEFAULT_PROBE_GROWTH = 1.25
#: A 429 cuts the rate only when 429s are more than this share of the permits granted in
#: the last window. Pacing just under a strict server's capacity still draws the odd 429
#: from network jitter; retrying it costs one attempt, while cutting for it costs a tenth
#: of the throughput for seconds (goodput 0.80 -> 0.9x in benchmarks/bench_storm.py).
DEFAULT_TOLERANCE = 0.05

# A deadline closer than this counts as reached. asyncio runs a timer up to one clock tick
# early (BaseEventLoop uses the same resolution), and float sums miss by an ulp
# (0.1 + 0.2 > 0.3, 3.05 - 2.05 < 1.0): without the slack a waiter would wake a hair early
# and sleep again for 1e-17 s, and a window would not count as over when it is.
_SLACK = max(1e-9, time.get_clock_info("monotonic").resolution)
_NEVER = -math.inf
# A send rate is measured only over at least this share of a window of open gate.
_MIN_SPAN = 0.25
# Cuts are futile when the rate fell to this share of the reference and the share of
# attempts the server accepts did not grow.
_FUTILE_DROP = 0.75


@attrs.frozen(kw_only=True)
class LimiterStatistics:
    """A snapshot of a limiter, from `Limiter.statistics()`.

    * ``rate``: the current pacing rate in requests per second; None while unpaced.
    * ``ceiling``: the configured maximum in requests per second; None for no ceiling.
    * ``burst``: permits that may go back to back after an idle spell.
    * ``paused_for``: seconds left on the pause gate; 0.0 when it is open.
    * ``permits``: permits granted so far.
    * ``waiting``: tasks inside ``acquire()`` right now.
    * ``rate_limited``: 429s reported through ``on_rate_limited``.
    * ``cuts``: adaptive cuts made (at most one per window).

    Example::

        stats = limiter.statistics()
        print(f"{stats.rate or 'unpaced'} req/s, {stats.waiting} waiting")
    """

    rate: float | None
    ceiling: float | None
    burst: int
    paused_for: float
    permits: int
    waiting: int
    rate_limited: int
    cuts: int


class Limiter(abc.ABC):
    """The interface the client and the fan-out talk to; a Redis implementation will follow.

    Call `acquire` before every attempt (retries included), then report how it went:
    `on_rate_limited` for a 429, `on_success` for a 2xx (other errors report nothing: a
    failing server is the retry budget's business, not the pacer's).
    All methods are called from the event loop.

    Example::

        await limiter.acquire()
        response = await post(...)
        if response.status == 429:
            limiter.on_rate_limited(retry_after)   # seconds, or None if not sent
        else:
            limiter.on_success()
    """

    @abc.abstractmethod
    async def acquire(self) -> None:
        """Wait until the pause gate is open, then for a pacing permit."""

    def try_acquire(self) -> bool:
        """Take a permit if one is due right now, without waiting; False otherwise.

        Callers try this first and await `acquire` only when it says False, so a permit
        that needs no wait costs no coroutine. The default says False: a limiter whose
        permits need I/O (Redis) simply always goes through `acquire`.
        """
        return False

    @abc.abstractmethod
    def on_success(self) -> None:
        """Report an attempt that got a 2xx answer."""

    @abc.abstractmethod
    def on_rate_limited(self, retry_after: float | None) -> None:
        """Report a 429; ``retry_after`` (seconds, or None) shuts the pause gate that long."""

    @abc.abstractmethod
    def statistics(self) -> LimiterStatistics:
        """Return a snapshot of the limiter's state."""


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValidationError(name, value, "a finite number > 0")
    return float(value)


class RateLimiter(Limiter):
    """The in-process `Limiter`: a pause gate, GCRA pacing and an adaptive throttle.

    * ``rate`` requests per ``per`` seconds is the ceiling, never exceeded, not even while
      recovering; ``rate=None`` (the default) sets no ceiling: unpaced until the first 429
      (when ``adaptive``), then paced.
    * ``burst``: after an idle spell up to ``burst`` permits go back to back. There is no
      startup burst: a fresh limiter grants one permit at once and paces the rest; burst
      credit accrues only while idle.
    * ``horizon``: no permit is booked more than this many seconds ahead. Waiters beyond it
      queue (first in, first out) and book when their slot comes within reach, so a cut
      applies to them.
    * The pause gate: ``on_rate_limited(retry_after)`` shuts it until
      ``max(pause_until, now + retry_after)`` when the 429 is overload (below) or its
      ``retry_after`` is longer than ``window``; a tolerated one only delays its own
      retry. Nobody gets a permit before then, and a permit booked inside the pause is
      booked again after it. When the gate opens, waiters
      leave at the paced rate, not all at once (unless the limiter is unpaced).
    * ``adaptive``: on a 429 that makes 429s more than ``tolerance`` (5 %) of the
      permits granted in the last ``window`` (a lone 429 from network jitter is retried,
      not punished), at most once per ``window`` seconds, cut the rate to
      ``max(min_rate, decrease_factor * min(rate, sent))`` where ``sent`` is the number of
      permits granted in the last ``window`` seconds divided by ``window``. The next permit
      comes one new interval after the last one booked. Recovery: a success reported a
      full ``window`` or more after the last 429 (or the last growth step) adds
      ``increase`` req/s, up to the ceiling. ``increase`` defaults to 5 % of the ceiling,
      or with no ceiling 10 % of the rate the last cut set, and at least 0.5 req/s. With
      no ceiling the rate keeps growing by that step until the next 429 cuts it; it never
      goes back to unpaced. The first cut of an unpaced limiter measures a send rate that
      began a moment ago, so until the next 429 it grows by ``DEFAULT_PROBE_GROWTH``
      (x1.25) per window instead, to find the server's capacity in a few windows.

    Cancelling a task inside `acquire` is safe: ``waiting`` drops and nothing stays locked.
    If the task had already booked a slot, that slot is wasted: it is not handed back to
    the next waiter (the schedule runs a little below the rate, never above).

    Created outside an event loop or inside one; it binds to the first running loop that
    uses it and rebinds (clearing its clock state) when idle under another.

    Example::

        limiter = RateLimiter(600, per=60, burst=5)   # 10 req/s at most, bursts of 5
        await limiter.acquire()
        ...
        limiter.on_success()
        print(limiter)   # <RateLimiter rate=10/s ceiling=10/s burst=5 paused_for=0s waiting=0>
    """

    def __init__(
        self,
        rate: float | None = None,
        *,
        per: float = DEFAULT_PER,
        burst: int = DEFAULT_BURST,
        adaptive: bool = True,
        decrease_factor: float = DEFAULT_DECREASE_FACTOR,
        window: float = DEFAULT_WINDOW,
        increase: float | None = None,
        min_rate: float = DEFAULT_MIN_RATE,
        horizon: float = DEFAULT_HORIZON,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        per = _check_positive("per", per)
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, int | float)
            or not 0 <= tolerance < 1
        ):
            raise ValidationError("tolerance", tolerance, "a number from 0 (inclusive) to 1")
        self._tolerance = float(tolerance)
        ceiling = None if rate is None else _check_positive("rate", rate) / per
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValidationError("burst", burst, "an int >= 1")
        if (
            isinstance(decrease_factor, bool)
            or not isinstance(decrease_factor, int | float)
            or not 0 < decrease_factor < 1
        ):
            raise ValidationError("decrease_factor", decrease_factor, "a number between 0 and 1")
        self._window = _check_positive("window", window)
        self._increase = None if increase is None else _check_positive("increase", increase)
        self._min_rate = _check_positive("min_rate", min_rate)
        self._horizon = _check_positive("horizon", horizon)
        self._ceiling = ceiling
        self._burst = burst
        self._adaptive = bool(adaptive)
        self._decrease_factor = float(decrease_factor)

        # Pacing. `_interval` is 0.0 while unpaced; `_tat` is None until the first booking.
        self._rate = ceiling
        self._interval = 0.0
        self._tau = 0.0
        if ceiling is not None:
            self._set_rate(ceiling)
        self._tat: float | None = None
        self._last_slot = _NEVER  # the latest slot booked (or unpaced grant)
        self._pause_until = _NEVER

        # The adaptive throttle.
        self._grants: collections.deque[float] = collections.deque()  # times, last window
        self._limited: collections.deque[float] = collections.deque()  # 429 times, likewise
        self._last_cut = _NEVER
        self._calm_since = _NEVER  # the last 429 or growth step
        self._recovering = False  # below the ceiling after a cut (always, with no ceiling)
        self._probing = False  # after the first cut from unpaced: grow multiplicatively
        # Successes per window, for the floor under a cut and the futility test.
        self._successes = 0
        self._success_mark = (_NEVER, 0)  # (start of the current count, count then)
        self._success_rate = 0.0  # successes/s over the last full window
        self._first_grant = _NEVER
        # Futility: the rate and accepted share when cuts were last seen to work.
        self._reference: tuple[float, float] | None = None
        self._futile = False  # 429s do not fall with the rate: the server's own reasons
        self._step = 0.0
        if ceiling is not None:
            self._step = self._increase or max(
                DEFAULT_MIN_INCREASE, DEFAULT_INCREASE_SHARE_OF_CEILING * ceiling
            )

        # Per-loop state, made lazily in the running loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._line: asyncio.Lock | None = None  # the queue beyond the horizon or the gate
        self._queued = 0  # tasks in (or entering) the line

        self._permits = 0
        self._waiting = 0
        self._rate_limited = 0
        self._cuts = 0

    # -- the hot path ------------------------------------------------------------------

    async def acquire(self) -> None:
        """Wait until the pause gate is open, then for a pacing permit.

        Returns at once, without suspending, when the gate is open, nobody is queued and
        a permit is due (always, while unpaced).
        """
        if self.try_acquire():
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot: float | None = None
        if not self._queued and now + _SLACK >= self._pause_until:
            # try_acquire found the permit not yet due: book it (within the horizon).
            slot = self._reserve(now)
        self._waiting += 1
        try:
            while True:
                if slot is None:
                    slot = await self._book_in_line(loop)
                delay = slot - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if slot + _SLACK >= self._pause_until:
                    break
                # A 429 shut the gate over our slot while we slept. The slot is forfeit;
                # queue again behind the gate, which pushed `tat` past its end.
                slot = None
            self._grant(loop.time())
        finally:
            self._waiting -= 1

    def try_acquire(self) -> bool:
        """Take a permit if the gate is open, nobody is queued and a permit is due now."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        now = loop.time()
        if self._queued or now + _SLACK < self._pause_until:
            return False
        if not self._interval:
            # Unpaced, the gate open: nothing to book.
            self._last_slot = now
            self._permits += 1
            if self._adaptive:
                self._record(now)
            return True
        tat = self._tat
        if tat is not None and tat - self._tau > now:
            return False  # not due yet: acquire() books it and sleeps
        # Due now, so _reserve books it for now: it is never beyond the horizon.
        self._reserve(now)
        self._grant(now)
        return True

    def _reserve(self, now: float) -> float | None:
        """Book the next slot and return it, or return None if it lies beyond the horizon."""
        if not self._interval:
            self._last_slot = now
            return now
        tat = self._tat
        if tat is None:
            # A fresh limiter has no burst credit: `tat = now + tau` is the state a full
            # burst leaves one interval on. This permit goes now, the next one T later:
            # no startup burst.
            tat = now + self._tau
        elif tat < now:
            # Idle since `tat`: the credit that accrued meanwhile is capped at `tau`, i.e. at
            # `burst` permits, by starting from `now` rather than from the old `tat`.
            tat = now
        # A permit may go `tau` before its theoretical time; that slack is the burst.
        slot = tat - self._tau
        if slot < now:
            slot = now
        elif slot - now > self._horizon + _SLACK:
            return None
        # The next permit is due T after this one's theoretical time, not T after `now`:
        # a late wake-up shortens the next wait instead of delaying every later permit.
        self._tat = tat + self._interval
        self._last_slot = slot
        return slot

    async def _book_in_line(self, loop: asyncio.AbstractEventLoop) -> float:
        """Queue (FIFO) behind the pause gate and the horizon, then book a slot."""
        if self._line is None:
            self._line = asyncio.Lock()
        self._queued += 1
        try:
            # Only the head of the line sleeps on a timer; the others wait on the lock, so
            # a permit costs O(1) wake-ups however long the line is.
            async with self._line:
                while True:
                    now = loop.time()
                    if now + _SLACK < self._pause_until:
                        await asyncio.sleep(self._pause_until - now)
                        continue
                    slot = self._reserve(now)
                    if slot is not None:
                        return slot
                    # Our slot lies beyond the horizon: sleep until it comes within reach
                    # and look again, so a cut made meanwhile applies to us as well.
                    assert self._tat is not None
                    await asyncio.sleep(self._tat - self._tau - self._horizon - now)
        finally:
            self._queued -= 1

    def _grant(self, now: float) -> None:
        self._permits += 1
        if self._adaptive:
            self._record(now)

    def _record(self, now: float) -> None:
        # Grant times of the last window, oldest first: each is appended once and popped
        # once, so keeping the measured send rate costs O(1) amortised.
        grants = self._grants
        if not grants and self._first_grant == _NEVER:
            self._first_grant = now
        grants.append(now)
        cutoff = now - self._window
        while grants[0] <= cutoff:
            grants.popleft()
        started, count = self._success_mark
        if now - started >= self._window:
            if started != _NEVER:
                self._success_rate = (self._successes - count) / (now - started)
            self._success_mark = (now, self._successes)

    # -- feedback ----------------------------------------------------------------------

    def on_success(self) -> None:
        """Report a processed attempt; after a full window without a 429, grow the rate.

        Each call grows the rate by at most one step, so an idle spell is no credit.
        """
        self._successes += 1
        if not self._recovering:
            return
        now = self._now()
        if now - self._calm_since + _SLACK < self._window:
            return
        self._calm_since = now
        assert self._rate is not None
        rate = self._rate * DEFAULT_PROBE_GROWTH if self._probing else self._rate + self._step
        if self._ceiling is not None and rate >= self._ceiling:
            rate = self._ceiling
            self._recovering = False
        # Growing needs no change to `tat`: the next permit stays at least one old (longer)
        # interval after the last, and only later ones come closer together.
        self._set_rate(rate)

    def on_rate_limited(self, retry_after: float | None) -> None:
        """Report a 429: shut the pause gate for ``retry_after`` seconds, cut the rate.

        ``retry_after=None`` (no Retry-After sent) leaves the gate as it is.
        """
        if retry_after is not None and (
            isinstance(retry_after, bool)
            or not isinstance(retry_after, int | float)
            or not 0 <= retry_after < math.inf
        ):
            raise ValidationError("retry_after", retry_after, "a finite number >= 0, or None")
        now = self._now()
        self._rate_limited += 1
        overloaded = not self._adaptive or self._overloaded(now)
        if self._adaptive and overloaded and self._is_futile(now):
            # Cutting has not made the server accept a larger share: it refuses for reasons
            # of its own (per-request quotas, a fixed share of 429s). Further cuts and
            # pauses would only collapse the rate; the 429 just delays its own retry.
            overloaded = False
        if self._adaptive and overloaded:
            # Only a 429 that counts as overload stops recovery; a tolerated one is just
            # retried, and the rate keeps probing upwards.
            self._calm_since = now
            if now - self._last_cut + _SLACK >= self._window:
                self._cut(now)
        # A tolerated 429 with a short Retry-After (jitter at a strict server's edge) makes
        # only its own request wait; shutting the gate for everyone would cost a slot per
        # 429. Overload, or a long Retry-After (a spent quota), pauses everyone.
        if retry_after and (overloaded or retry_after > self._window):
            self._pause_until = max(self._pause_until, now + retry_after)
        if self._interval and self._pause_until > now:
            # Let the first permit after the gate go at `pause_until` and the rest follow at
            # the paced rate, instead of releasing everyone queued behind the gate at once;
            # `+ tau` leaves no burst credit, however long the pause was.
            floor = self._pause_until + self._tau
            if self._tat is None or self._tat < floor:
                self._tat = floor

    def _overloaded(self, now: float) -> bool:
        """Record a 429; True when 429s are more than ``tolerance`` of the window's sends."""
        limited = self._limited
        cutoff = now - self._window
        if not limited or limited[-1] <= cutoff:
            # A window without a 429: whatever storm taught us about futility is over.
            self._reference = None
            self._futile = False
        limited.append(now)
        while limited[0] <= cutoff:
            limited.popleft()
        grants = self._grants
        while grants and grants[0] <= cutoff:
            grants.popleft()
        return len(limited) > self._tolerance * max(len(grants), 1)

    def _sent_rate(self, now: float) -> float | None:
        """Permits per second over the last window, or the part of it the gate was open.

        None when that part is too short to measure (just after a pause): a near-empty
        window after a pause would read as a tiny send rate and cut the rate to nothing.
        """
        grants = self._grants
        cutoff = now - self._window
        while grants and grants[0] <= cutoff:
            grants.popleft()
        # Measure from the latest of: a window ago, the gate's last opening, the first
        # permit ever (a window in which traffic just began is not a send rate either).
        began = max(cutoff, self._pause_until, self._first_grant)
        span = now - began
        if span < _MIN_SPAN * self._window:
            return None
        if span >= self._window:
            return len(grants) / self._window
        start = now - span
        return sum(1 for t in grants if t > start) / span

    def _cut(self, now: float) -> None:
        sent = self._sent_rate(now)
        if self._rate is None and sent is None:
            # The first 429 of an unpaced limiter, a moment after traffic began: the
            # window's sends are the only estimate there is; probing corrects it.
            sent = len(self._grants) / self._window
        current = math.inf if self._rate is None else self._rate
        measured = current if sent is None else min(current, sent)
        # The rate the server has just been serving is no overload: never cut below half
        # of it, so a cut cannot collapse the rate while successes keep coming.
        floor = max(self._min_rate, 0.5 * self._success_rate)
        rate = max(floor, self._decrease_factor * measured)
        if self._ceiling is not None and rate > self._ceiling:
            rate = self._ceiling  # min_rate may exceed a per-minute ceiling: the ceiling wins
        self._last_cut = now
        self._cuts += 1
        self._probing = self._rate is None
        self._recovering = self._ceiling is None or rate < self._ceiling
        if self._ceiling is None:
            self._step = self._increase or max(
                DEFAULT_MIN_INCREASE, DEFAULT_INCREASE_SHARE_OF_CUT * rate
            )
        self._set_rate(rate)
        if self._last_slot != _NEVER:
            # The cut applies from the last permit booked: the next one goes a full new
            # interval after it, with the bucket full (`+ tau`), so a bigger `tau` cannot
            # turn into an instant burst. Permits already booked keep their slots; the
            # horizon bounds how many there are.
            floor_tat = self._last_slot + self._interval + self._tau
            if self._tat is None or self._tat < floor_tat:
                self._tat = floor_tat

    def _is_futile(self, now: float) -> bool:
        """Whether cutting has stopped helping: since the reference point the rate fell by
        a quarter, yet the share of attempts the server accepted did not grow.

        A server at its capacity accepts a larger share as the rate falls towards it; one
        that refuses a fixed share (or every first attempt) accepts the same share at any
        rate. Once futile, cuts stay off until the server accepts nearly everything again
        or refuses a clearly larger share (a real overload on top).
        """
        if now - self._last_cut + _SLACK < self._window or self._rate is None:
            return self._futile
        limited = len(self._limited)
        successes = self._success_rate * self._window
        share = successes / (successes + limited) if successes + limited else 0.0
        reference = self._reference
        if reference is None:
            self._reference = (self._rate, share)
        elif self._futile:
            if share < 0.5 * reference[1]:
                # A clearly larger share refused: a real overload on top. Cut again.
                self._reference = (self._rate, share)
                self._futile = False
        elif share > 1.1 * reference[1] + 0.02:
            # Cuts are working: measure the next ones from here.
            self._reference = (self._rate, share)
        elif self._rate <= _FUTILE_DROP * reference[0]:
            self._futile = True
            # Give back what the futile cuts took and find the server's pace again fast.
            rate = reference[0] if self._ceiling is None else min(reference[0], self._ceiling)
            self._set_rate(rate)
            self._probing = True
            self._recovering = self._ceiling is None or rate < self._ceiling
        return self._futile

    def _set_rate(self, rate: float) -> None:
        self._rate = rate
        self._interval = 1.0 / rate
        self._tau = (self._burst - 1) * self._interval

    # -- the event loop ----------------------------------------------------------------

    def _now(self) -> float:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        return loop.time()

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._waiting or self._queued:
            raise RuntimeError(
                "this RateLimiter has waiters in another event loop; use one per loop"
            )
        # Another loop has another clock: times from the old one mean nothing here. The
        # rate learnt so far is kept.
        self._loop = loop
        self._line = None
        self._tat = None
        self._last_slot = self._pause_until = self._last_cut = self._calm_since = _NEVER
        self._first_grant = _NEVER
        self._success_mark = (_NEVER, self._successes)
        self._grants.clear()

    # -- state -------------------------------------------------------------------------

    def statistics(self) -> LimiterStatistics:
        """Return a snapshot of the limiter's state (safe from any thread)."""
        paused_for = 0.0
        if self._loop is not None and self._pause_until != _NEVER:
            paused_for = max(0.0, self._pause_until - self._loop.time())
        return LimiterStatistics(
            rate=self._rate,
            ceiling=self._ceiling,
            burst=self._burst,
            paused_for=paused_for,
            permits=self._permits,
            waiting=self._waiting,
            rate_limited=self._rate_limited,
            cuts=self._cuts,
        )

    def __repr__(self) -> str:
        stats = self.statistics()
        rate = "unpaced" if stats.rate is None else f"{stats.rate:g}/s"
        ceiling = "none" if stats.ceiling is None else f"{stats.ceiling:g}/s"
        return (
            f"<{type(self).__name__} rate={rate} ceiling={ceiling} burst={stats.burst}"
            f" paused_for={stats.paused_for:g}s waiting={stats.waiting}>"
        )


class ConcurrencyLimit:
    """At most ``limit`` tasks inside at once: a FIFO semaphore with a wait-free fast path.

    Use ``async with limit:``, or `acquire` and `release` in pairs.

    Example::

        limit = ConcurrencyLimit(8)
        async with limit:
            await post(...)
        print(limit.in_flight, "of", limit.limit)
    """

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValidationError("limit", limit, "an int >= 1")
        self._limit = limit
        self._in_flight = 0
        self._free = limit
        # Waiters in arrival order. A hand-over gives the slot straight to the next live
        # waiter (set_result), so a released slot cannot be stolen by a newcomer.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def limit(self) -> int:
        """The most tasks allowed inside at once."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Tasks inside right now."""
        return self._in_flight

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is queued; never waits.

        The hot path: a fan-out with one worker per slot always finds one free, so it
        pays no coroutine for it.
        """
        if self._free and not self._waiters:
            self._free -= 1
            self._in_flight += 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a free slot and take it."""
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we were cancelled: pass it on.
                self._in_flight += 1
                self.release()
            else:
                # release() may already have dropped it as done.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        self._in_flight += 1

    def release(self) -> None:
        """Give back a slot taken with `acquire`."""
        if not self._in_flight:
            raise RuntimeError("ConcurrencyLimit.release() without a matching acquire()")
        self._in_flight -= 1
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} limit={self._limit} in_flight={self._in_flight}>"

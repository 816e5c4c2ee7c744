"""The adaptive controller: from 429s and successes, the rate a pacer should send at.

It decides; it does not wait. Every event comes with its time as a plain number, and the
only thing it touches outside itself is the `RateTarget` it drives (``rate`` and
``set_rate``), so the in-process `Pacer` and a pacer shared across processes are driven by
the same controller.
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Callable
from typing import Protocol

from ._exceptions import ValidationError
from ._timing import NEVER, SLACK, check_positive

__all__ = [
    "DEFAULT_DECREASE_FACTOR",
    "DEFAULT_INCREASE_SHARE_OF_CEILING",
    "DEFAULT_INCREASE_SHARE_OF_CUT",
    "DEFAULT_MIN_INCREASE",
    "DEFAULT_MIN_RATE",
    "DEFAULT_PROBE_GROWTH",
    "DEFAULT_TOLERANCE",
    "DEFAULT_WINDOW",
    "AdaptiveController",
    "RateTarget",
]

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

#: After a 429 whose Retry-After shut the gate for everyone, the rate grows again only
#: after this many times that pause (at most a minute) of calm: a pause costs every
#: caller, so returning to the pace that drew it must be rare (`on_rate_limited`).
PAUSE_HOLD = 10.0
_LONGEST_HOLD = 60.0

#: The cut for such a 429 (`DEFAULT_DECREASE_FACTOR` for any other): each pause it draws
#: costs every caller, so the rate comes under the server's in fewer of them.
PAUSE_DECREASE_FACTOR = 0.75

# A send rate is measured only over at least this share of a window of open gate.
_MIN_SPAN = 0.25
# Cuts are futile when the rate fell to this share of the reference and the share of
# attempts the server accepts did not grow.
_FUTILE_DROP = 0.82


class RateTarget(Protocol):
    """What `AdaptiveController` drives: a pacer's rate. `Pacer` is one.

    Example::

        class SharedPacer:                       # keeps its state in Redis, say
            rate: float | None = None
            def set_rate(self, rate: float | None, *, cut: bool = False) -> None:
                self.rate = rate                 # and write it where every process reads it

        controller = AdaptiveController(SharedPacer(), ceiling=None)
    """

    @property
    def rate(self) -> float | None:
        """Permits per second now; None while unpaced."""

    def set_rate(self, rate: float | None, *, cut: bool = False) -> None:
        """Pace at ``rate`` (> 0) from now on, or stop pacing (None); ``cut=True`` when
        slowing down for a 429."""


class _Futility:
    """Whether cuts have stopped helping: the rate fell by a quarter from one stretch of
    answers to the next, yet the share the server accepted did not grow.

    A server at its capacity accepts a larger share as the rate falls towards it; one that
    refuses a fixed share (or every first attempt) accepts the same share at any rate.
    Shares are counted over *stretches* of answers, not windows: at a low rate, or with
    the gate shut most of the time, a window holds one answer or none, and a verdict needs
    a few (`_MIN_EVIDENCE`). Once futile, cuts stay off until a clearly larger share is
    refused (a real overload on top), or the limiter moves to a new clock (`clear`).
    """

    __slots__ = ("futile", "origin", "reference", "stretch")

    def __init__(self) -> None:
        self.futile = False  # 429s do not fall with the rate: the server's own reasons
        # The rate before the storm's first cut (None: unpaced), given back when futile.
        self.origin: float | object | None = _UNSET
        # The last stretch weighed: (its rate, the share accepted in it).
        self.reference: tuple[float, float] | None = None
        # The stretch being counted: (its rate, successes and 429s so far when it began).
        self.stretch: tuple[float, int, int] | None = None

    def clear(self) -> None:
        self.futile = False
        self.origin = _UNSET
        self.reference = None
        self.stretch = None

    def observe(self, rate: float, successes: int, limited: int) -> bool:
        """Weigh the answers so far (running totals) at the current ``rate``; True when
        the cuts have just turned out futile (the caller then gives back `origin`)."""
        stretch = self.stretch
        if stretch is None:
            self.stretch = (rate, successes, limited)
            return False
        start_rate, s0, l0 = stretch
        answers = (successes - s0) + (limited - l0)
        if answers < _MIN_EVIDENCE or (not self.futile and rate > _FUTILE_DROP * start_rate):
            return False  # not enough answers, or not enough change, to weigh yet
        share = (successes - s0) / answers
        reference = self.reference
        self.stretch = (rate, successes, limited)
        if reference is None:
            self.reference = (start_rate, share)
        elif self.futile:
            if share < 0.5 * reference[1] and answers >= 2 * _MIN_EVIDENCE:
                # A clearly larger share refused: a real overload on top. Cut again.
                self.reference = (start_rate, share)
                self.futile = False
        elif share > 1.1 * reference[1] + 0.02:
            self.reference = (start_rate, share)  # cuts are working: carry on
        else:
            self.futile = True
            return True
        return False


_UNSET = object()
# Answers (successes and 429s) a stretch needs before its share is weighed: with fewer,
# the noise in a share passes for a change. Twice as many to leave the futile state.
_MIN_EVIDENCE = 10


class _Traffic:
    """What the controller measures: the permits and 429s of the last window, and the
    successes per second over the last full window.

    Grant and 429 times are kept oldest first: each is appended once and popped once, so
    keeping them costs O(1) amortised, and counting the grants after a time is a binary
    search. The grants kept are the last
    window's before the newest grant, not before now: when answers take longer than a
    window, a 429 answers permits granted before the last window, and the send rate is
    measured where they went (`_end`).
    """

    __slots__ = (
        "first_grant",
        "grants",
        "limited",
        "limited_total",
        "success_mark",
        "success_rate",
        "successes",
        "window",
    )

    def __init__(self, window: float) -> None:
        self.window = window
        self.grants: collections.deque[float] = collections.deque()  # times, last window
        self.limited: collections.deque[float] = collections.deque()  # 429 times, likewise
        self.first_grant = NEVER
        self.successes = 0
        self.limited_total = 0
        self.success_mark = (NEVER, 0)  # (start of the current count, count then)
        self.success_rate = 0.0  # successes/s over the last full window

    def on_grant(self, now: float) -> None:
        grants = self.grants
        if not grants and self.first_grant == NEVER:
            self.first_grant = now
        grants.append(now)
        cutoff = now - self.window
        while grants[0] <= cutoff:
            grants.popleft()
        started, count = self.success_mark
        if now - started >= self.window:
            if started != NEVER:
                self.success_rate = (self.successes - count) / (now - started)
            self.success_mark = (now, self.successes)

    def _end(self, now: float) -> float:
        """Where the measured window ends: ``now``, or the newest grant if none was made in
        the last window. Measured at ``now``, a fresh client whose calls' 429s came back
        1.5 s after them counted 0/s and was cut to min_rate (3 calls took 30 s)."""
        grants = self.grants
        if grants and grants[-1] <= now - self.window:
            return grants[-1]
        return now

    def _granted_after(self, cutoff: float) -> int:
        """The grants kept that came after ``cutoff``."""
        return len(self.grants) - bisect.bisect_right(self.grants, cutoff)

    def on_rate_limited(self, now: float) -> tuple[int, int]:
        """Record a 429; return the 429s of the last window and the permits of the
        measured one (`_end`)."""
        limited = self.limited
        cutoff = now - self.window
        limited.append(now)
        self.limited_total += 1
        while limited[0] <= cutoff:
            limited.popleft()
        return len(limited), self.granted(now)

    def granted(self, now: float) -> int:
        """The permits granted in the measured window (`_end`)."""
        return self._granted_after(self._end(now) - self.window)

    def sent_rate(self, now: float, gate_opened: float) -> float | None:
        """Permits per second over the measured window (`_end`), or the part of it the
        gate was open.

        None when that part is too short to measure (just after a pause): a near-empty
        window after a pause would read as a tiny send rate and cut the rate to nothing.
        """
        end = self._end(now)
        cutoff = end - self.window
        # Measure from the latest of: a window ago, the gate's last opening, the first
        # permit ever (a window in which traffic just began is not a send rate either).
        began = max(cutoff, gate_opened, self.first_grant)
        span = end - began
        if span < _MIN_SPAN * self.window:
            return None
        if span >= self.window:
            return self._granted_after(cutoff) / self.window
        # `>=`: the permit that began the span is in it. Left out, a fresh client's one
        # call whose 429 came back 0.3 s later measured 0/s and was cut to min_rate.
        return (len(self.grants) - bisect.bisect_left(self.grants, began)) / span

    def forget_times(self) -> None:
        self.grants.clear()
        self.limited.clear()
        self.first_grant = NEVER
        self.success_mark = (NEVER, self.successes)


class AdaptiveController:
    """Cut the rate on overload 429s, grow it back in calm windows; never above a ceiling.

    * On a 429 that makes 429s more than ``tolerance`` of the permits granted in the last
      ``window`` (overload), at most once per window, cut to ``max(floor, decrease_factor *
      min(rate, sent))``: ``sent`` is the permits per second over the part of the last
      window the gate was open and traffic flowing, ``floor`` is ``max(min_rate, half the
      recent successes per second)``. No cut for the answers to the few permits a long
      pause (a Retry-After longer than the window) let out in its first window: the
      pause throttles, and cutting for each collapsed the rate over a storm.
    * A 429 whose Retry-After is longer than the window (it pauses everyone) is overload
      whatever its share. When it comes alone at a pace held a window at least, the pace
      drew it: the cut is by `PAUSE_DECREASE_FACTOR` (0.75), doubling stops, and the rate
      grows again only after `PAUSE_HOLD` times the pause (at most a minute) of calm.
    * A success a full window after the last overload 429 (or the last step) grows the rate
      by ``increase`` (default: 5 % of the ceiling; with none, 10 % of the rate the last cut
      set; at least 0.5/s), or by x1.25 while probing after the first cut from unpaced.
    * Futility: once cuts have taken a quarter off the rate without the server accepting
      a larger share, its 429s are its own: the rate is given back and 429s stop counting
      as overload until a window without one.

    Tell it every grant (`on_grant`), success (`on_success`) and 429 (`on_rate_limited`);
    it sets the rate of ``target``. Times are plain numbers from one clock.

    Example::

        pacer = Pacer(10.0)
        controller = AdaptiveController(pacer, ceiling=10.0, tolerance=0)
        for k in range(1, 11):
            controller.on_grant(k / 10)            # 10/s for a second...
        controller.on_rate_limited(1.0, gate_opened=-math.inf)  # True: overload, 9/s
        controller.on_success(lambda: 2.0)         # a calm window later: 9.5/s
        print(controller)
        # <AdaptiveController rate=9.5/s ceiling=10/s cuts=1 mode=recovering success_rate=0/s>
    """

    __slots__ = (
        "_calm_since",
        "_ceiling",
        "_cuts",
        "_decrease_factor",
        "_futility",
        "_increase",
        "_last_cut",
        "_min_rate",
        "_probing",
        "_recovering",
        "_server_rate",
        "_step",
        "_target",
        "_tolerance",
        "_traffic",
        "_window",
    )

    def __init__(
        self,
        target: RateTarget,
        *,
        ceiling: float | None,
        decrease_factor: float = DEFAULT_DECREASE_FACTOR,
        window: float = DEFAULT_WINDOW,
        increase: float | None = None,
        min_rate: float = DEFAULT_MIN_RATE,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        if (
            isinstance(decrease_factor, bool)
            or not isinstance(decrease_factor, int | float)
            or not 0 < decrease_factor < 1
        ):
            raise ValidationError("decrease_factor", decrease_factor, "a number between 0 and 1")
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, int | float)
            or not 0 <= tolerance < 1
        ):
            raise ValidationError("tolerance", tolerance, "a number from 0 (inclusive) to 1")
        self._target = target
        self._ceiling = None if ceiling is None else check_positive("ceiling", ceiling)
        self._decrease_factor = float(decrease_factor)
        self._window = check_positive("window", window)
        self._increase = None if increase is None else check_positive("increase", increase)
        self._min_rate = check_positive("min_rate", min_rate)
        self._tolerance = float(tolerance)

        self._traffic = _Traffic(self._window)
        self._last_cut = NEVER
        self._calm_since = NEVER  # the last overload 429 or growth step
        self._recovering = False  # below the ceiling after a cut (always, with no ceiling)
        self._probing = False  # after the first cut from unpaced: grow multiplicatively
        self._futility = _Futility()
        # The rate the server states in its quota headers (see `on_server_rate`).
        self._server_rate: float | None = None
        self._cuts = 0
        self._step = 0.0
        if self._ceiling is not None:
            self._step = self._increase or max(
                DEFAULT_MIN_INCREASE, DEFAULT_INCREASE_SHARE_OF_CEILING * self._ceiling
            )

    @property
    def ceiling(self) -> float | None:
        """The most permits per second it ever sets; None for no ceiling."""
        return self._ceiling

    @property
    def window(self) -> float:
        """Seconds: one cut at most per window, one growth step at most per calm window."""
        return self._window

    @property
    def cuts(self) -> int:
        """Cuts made so far."""
        return self._cuts

    @property
    def server_rate(self) -> float | None:
        """The rate the server stated last (`on_server_rate`); None if it never did."""
        return self._server_rate

    def _cap(self) -> float | None:
        """The most it grows to: the ceiling, or the server's stated rate if lower."""
        ceiling, server = self._ceiling, self._server_rate
        if server is None:
            return ceiling
        return server if ceiling is None else min(ceiling, server)

    @property
    def futile(self) -> bool:
        """Whether 429s are taken for the server's own (cuts did not help), not overload."""
        return self._futility.futile

    # -- events ------------------------------------------------------------------------

    def on_grant(self, now: float) -> None:
        """Record a permit granted at ``now``: the send rate is measured from these."""
        self._traffic.on_grant(now)

    def on_success(self, clock: Callable[[], float]) -> None:
        """Count a success; after a full window without an overload 429, grow the rate.

        ``clock()`` is read only when a step may be due, so most successes cost one
        increment. Each call grows the rate by at most one step: an idle spell is no credit.
        """
        self._traffic.successes += 1
        if not self._recovering:
            return
        now = clock()
        if now - self._calm_since + SLACK < self._window:
            return
        self._calm_since = now
        rate = self._target.rate
        assert rate is not None, "recovering only after a cut, which sets a rate"
        rate = rate * DEFAULT_PROBE_GROWTH if self._probing else rate + self._step
        cap = self._cap()
        if cap is not None and rate >= cap:
            rate = cap
            self._recovering = False
        self._target.set_rate(rate)

    def on_server_rate(self, rate: float, *, remaining: int) -> None:
        """The server stated its quota (``x-ratelimit-*`` headers): ``remaining`` requests
        left now, refilled at ``rate`` per second.

        That rate caps growth (recovery never probes past what the server says it
        serves). Pacing starts at it, or comes down to it, when the server's bucket is
        empty (``remaining == 0``: the next request faster than the refill gets a 429) or
        the limiter sends faster than the refill; below it, the rate grows back to it as
        after any cut. While the bucket has room an unpaced limiter stays unpaced. Called
        for every answer that carries the headers, so its cost is a few comparisons.

        Example::

            controller.on_server_rate(100.0, remaining=0)   # pace at 100/s from now on
        """
        cap = rate if self._ceiling is None else min(rate, self._ceiling)
        self._server_rate = rate
        current = self._target.rate
        if current is None:
            if remaining == 0:
                # Sending faster than the server refills: pace at its rate from the last
                # permit on, rather than learn it from a burst of 429s.
                self._target.set_rate(cap, cut=True)
                self._recovering = False
        elif current > cap:
            self._target.set_rate(cap, cut=True)
            self._recovering = False
        elif current < cap:
            self._recovering = True  # grow back to it (a cut may have gone deeper)

    def on_rate_limited(self, now: float, *, gate_opened: float, pause: float = 0.0) -> bool:
        """Record a 429 at ``now``; cut the rate if it is overload; return whether it is.

        ``gate_opened``: when the pause gate last opened (its ``pause_until`` before this
        429), so the send rate is measured only over time the gate was open. An overload
        429 should shut the gate for everyone; any other delays only its own retry.
        ``pause``: the seconds this 429 shuts the gate for everyone whatever its share (a
        Retry-After longer than the window). Such a 429 is overload too, and the rate does
        not grow again for `PAUSE_HOLD` times the pause: each return to the pace that drew
        it would cost every caller that pause again.
        """
        crowded = self._overloaded(now)  # 429s over `tolerance` of the window's permits
        if crowded and self._is_futile(now):
            # Cutting has not made the server accept a larger share: it refuses for reasons
            # of its own (per-request quotas, a fixed share of 429s). Further cuts and
            # pauses would only collapse the rate; the 429 just delays its own retry.
            crowded = False
        if self._futility.futile or (not crowded and pause <= 0):
            # A tolerated 429 is just retried, and the rate keeps probing upwards.
            return False
        self._calm_since = max(self._calm_since, now)
        due = now - self._last_cut + SLACK >= self._window
        if not crowded and due and self._target.rate is not None:
            # A long Retry-After that came alone, at a pace held a window at least (not an
            # answer to an unpaced burst, whose cut is a guess; not a storm, which refuses
            # most): the pace drew it, and each return to it costs everyone the pause
            # again. A deeper cut, no more doubling, and growth only after a long calm.
            self._cut(now, gate_opened, PAUSE_DECREASE_FACTOR)
            self._probing = False
            self._calm_since = now + min(PAUSE_HOLD * pause, _LONGEST_HOLD)
        elif due and not (pause > 0 and now - gate_opened + SLACK < self._window):
            # (A long pause that ended less than a window ago let a few permits out, not a
            # pace: its 429s say the server still refuses, the pause throttling, not that
            # the rate is too high; cutting for each collapsed the rate over a storm.)
            self._cut(now, gate_opened)
        return True

    def forget_times(self) -> None:
        """Drop every time recorded (a new clock: old times mean nothing); keep the rate."""
        self._traffic.forget_times()
        self._last_cut = self._calm_since = NEVER
        self._futility.clear()

    # -- decisions ---------------------------------------------------------------------

    def _overloaded(self, now: float) -> bool:
        """Record a 429; True when 429s are more than ``tolerance`` of the window's sends."""
        limited, grants = self._traffic.on_rate_limited(now)
        return limited > self._tolerance * max(grants, 1)

    def _cut(self, now: float, gate_opened: float, factor: float | None = None) -> None:
        traffic = self._traffic
        sent = traffic.sent_rate(now, gate_opened)
        old = self._target.rate
        if old is None and sent is None:
            # The first 429 of an unpaced limiter, a moment after traffic began: the
            # window's sends are the only estimate there is; probing corrects it.
            sent = traffic.granted(now) / self._window
        current = math.inf if old is None else old
        measured = current if sent is None else min(current, sent)
        # The rate the server has just been serving is no overload: never cut below half
        # of it, so a cut cannot collapse the rate while successes keep coming.
        floor = max(self._min_rate, 0.5 * traffic.success_rate)
        rate = max(floor, (factor or self._decrease_factor) * measured)
        cap = self._cap()
        if cap is not None and rate > cap:
            rate = cap  # min_rate may exceed a per-minute ceiling: the ceiling wins
        if self._futility.origin is _UNSET:
            self._futility.origin = old
        self._last_cut = now
        self._cuts += 1
        self._probing = old is None and self._server_rate is None
        self._recovering = cap is None or rate < cap
        if self._ceiling is None:
            self._step = self._increase or max(
                DEFAULT_MIN_INCREASE, DEFAULT_INCREASE_SHARE_OF_CUT * rate
            )
        # The next permit goes one new interval after the last one booked.
        self._target.set_rate(rate, cut=True)

    def _is_futile(self, now: float) -> bool:
        """Whether cutting has stopped helping (`_Futility`); weighed a window after a cut."""
        rate = self._target.rate
        if now - self._last_cut + SLACK < self._window or rate is None:
            return self._futility.futile
        traffic = self._traffic
        if self._futility.observe(rate, traffic.successes, traffic.limited_total):
            # Give back what the futile cuts took: the rate before the storm (unpaced, if it
            # was), within the ceiling, and find the server's pace again fast from there.
            origin = self._futility.origin
            back = float(origin) if isinstance(origin, int | float) else None
            if self._ceiling is not None:
                back = self._ceiling if back is None else min(back, self._ceiling)
            self._target.set_rate(back)
            self._probing = True
            self._recovering = back is not None and (self._ceiling is None or back < self._ceiling)
        return self._futility.futile

    def __repr__(self) -> str:
        rate = self._target.rate
        mode = (
            "futile"
            if self._futility.futile
            else "probing"
            if self._probing and self._recovering
            else "recovering"
            if self._recovering
            else "steady"
        )
        return (
            f"<{type(self).__name__} rate={'unpaced' if rate is None else f'{rate:g}/s'}"
            f" ceiling={'none' if self._ceiling is None else f'{self._ceiling:g}/s'}"
            f" cuts={self._cuts} mode={mode} success_rate={self._traffic.success_rate:g}/s>"
        )

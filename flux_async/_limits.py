"""Rate control: the `Limiter` interface and `RateLimiter`, its in-process implementation.

Every attempt passes through here (``docs/design.md``, "The path of one prompt")::

    ConcurrencyLimit            take an in-flight slot
    Limiter.acquire()           wait while the pause gate is shut (a 429's Retry-After),
                                then take a pacing permit (GCRA, no startup burst, booked
                                at most ``horizon`` seconds ahead)
    ... POST ...
    Limiter.on_success()        not a 429: after a calm window, the rate grows additively
    Limiter.on_rate_limited()   a 429: shut the gate, cut the rate (at most once a window)
    Limiter.on_quota()          the server's x-ratelimit-* headers: its stated rate caps
                                growth, and pacing follows it once its bucket is empty

`Limiter` is the interface the client and the fan-out talk to; `RateLimiter` is the
in-process implementation (a Redis one will share one API key's quota across processes).
`RateLimiter` is three replaceable parts and what ties them to an event loop:

    Pacer               _pacer.py     GCRA arithmetic: which slot the next permit gets
    PauseGate           _gate.py      shut until a 429's Retry-After has passed
    AdaptiveController  _adaptive.py  cut on overload 429s, grow back when calm; it sets
                                      the pacer's rate through `RateTarget`
    RateLimiter         here          the FIFO line behind the gate and the horizon, the
                                      sleeps, loop binding, counters

The parts take times as plain numbers and never sleep, so a limiter sharing a quota across
processes can supply its own pacer and gate and reuse the controller unchanged.
"""

from __future__ import annotations

import abc
import asyncio

import attrs

from ._adaptive import (
    DEFAULT_DECREASE_FACTOR,
    DEFAULT_INCREASE_SHARE_OF_CEILING,
    DEFAULT_INCREASE_SHARE_OF_CUT,
    DEFAULT_MIN_INCREASE,
    DEFAULT_MIN_RATE,
    DEFAULT_PROBE_GROWTH,
    DEFAULT_TOLERANCE,
    DEFAULT_WINDOW,
    AdaptiveController,
)
from ._concurrency import ConcurrencyLimit
from ._exceptions import EventLoopError, ValidationError
from ._gate import PauseGate, long_pause, pauses_everyone
from ._pacer import DEFAULT_BURST, DEFAULT_HORIZON, Pacer
from ._quota import ServerRate
from ._ramp import RampLine
from ._timing import check_positive, check_retry_after

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
    """The interface the client and the fan-out talk to: `RateLimiter` in one process,
    ``flux_async.redis.RedisRateLimiter`` for a quota shared through Redis.

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
        """Wait until the pause gate is open, then for a pacing permit.

        Example::

            await limiter.acquire()   # before every attempt, retries included
        """

    def try_acquire(self) -> bool:
        """Take a permit if one is due right now, without waiting; False otherwise.

        Callers try this first and await `acquire` only when it says False, so a permit
        that needs no wait costs no coroutine. The default says False: a limiter whose
        permits need I/O (Redis) simply always goes through `acquire`.

        Example::

            if not limiter.try_acquire():
                await limiter.acquire()
        """
        return False

    @abc.abstractmethod
    def on_success(self) -> None:
        """Report an attempt that got a 2xx answer.

        Example::

            limiter.on_success()   # the attempt got a 2xx
        """

    @abc.abstractmethod
    def on_rate_limited(self, retry_after: float | None) -> None:
        """Report a 429; ``retry_after`` (seconds, or None) shuts the pause gate that long.

        Example::

            if response.status == 429:
                limiter.on_rate_limited(retry_after)   # seconds, or None if none was sent
        """

    def on_quota(self, limit: int, remaining: int, reset: float) -> None:  # noqa: B027
        """Report the server's stated request quota, from any answer that carried it:
        ``limit`` requests, ``remaining`` of them left now, the whole quota back in
        ``reset`` seconds (``x-ratelimit-limit-requests``, ``-remaining-requests``,
        ``-reset-requests``). The default does nothing: a limiter may ignore it.

        Example::

            quota = parse_quota(response.headers)
            if quota is not None:
                limiter.on_quota(*quota)
        """

    @abc.abstractmethod
    def statistics(self) -> LimiterStatistics:
        """Return a snapshot of the limiter's state.

        Example::

            print(limiter.statistics().waiting, "tasks waiting for a permit")
        """


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
    * The pause gate: ``on_rate_limited(retry_after)`` shuts it until at least ``now +
      retry_after`` when the 429 is overload (below) or ``retry_after`` exceeds
      ``window``; a tolerated one only delays its own retry. A permit booked inside the
      pause is booked again after it; then waiters leave at the paced rate.
    * ``adaptive``: a 429 that makes 429s more than ``tolerance`` (5 %) of the window's
      permits, or whose Retry-After pauses everyone, is overload (any other lone 429 is
      just retried): at most once per ``window`` it
      cuts the rate to ``max(min_rate, decrease_factor * min(rate, sent))``, ``sent``
      being the last window's permits per second; a success a calm ``window`` later adds
      ``increase`` req/s, up to the ceiling. `AdaptiveController` has the details.
    * ``slow_start``: a fresh adaptive limiter with no ceiling grants 16 permits at once,
      then twice as many every 50 ms and two more per success (`StartRamp`) until a pace
      is set, so a first spike of 200 calls meets a rate-limited server with a few 429s
      instead of 180; the waiters it frees leave together. ``False`` grants all at once.

    Cancelling a task inside `acquire` is safe: nothing stays locked; a slot it had booked
    is wasted, not handed on (the schedule runs a little below the rate, never above).

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
        slow_start: bool = True,
    ) -> None:
        per = check_positive("per", per)
        ceiling = None if rate is None else check_positive("rate", rate) / per
        self._pacer = Pacer(ceiling, burst=burst, horizon=horizon)
        self._gate = PauseGate()
        # Made even when not adaptive: it checks the settings and knows the window, but
        # is then never told anything, so it never changes the rate.
        self._controller = AdaptiveController(
            self._pacer,
            ceiling=ceiling,
            decrease_factor=decrease_factor,
            window=window,
            increase=increase,
            min_rate=min_rate,
            tolerance=tolerance,
        )
        self._adaptive = bool(adaptive)
        if not isinstance(slow_start, bool):
            raise ValidationError("slow_start", slow_start, "True or False")
        # Only an unpaced limiter ramps: one with a ceiling paces from its first permit.
        self._ramp = RampLine() if slow_start and self._adaptive and ceiling is None else None

        # Per-loop state, made lazily in the running loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._line: asyncio.Lock | None = None  # the queue beyond the horizon or the gate
        self._queued = 0  # tasks in (or entering) the line
        self._permits = self._waiting = self._rate_limited = 0
        self._server_rate = ServerRate()  # read off the quota headers (`on_quota`)

    # -- the hot path ------------------------------------------------------------------

    async def acquire(self) -> None:
        """Wait until the pause gate is open, then for a pacing permit.

        Returns at once, without suspending, when the gate is open, nobody is queued and
        a permit is due (always, while unpaced).

        Example::

            limiter = RateLimiter(10)   # 10 req/s at most
            await limiter.acquire()     # the first permit at once, then one every 0.1 s
        """
        if self.try_acquire():
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        gate = self._gate
        slot: float | None = None
        if not self._queued and self._ramp is None and gate.is_open(now):
            # try_acquire found the permit not yet due: book it (within the horizon).
            slot = self._pacer.reserve(now)
        self._waiting += 1
        try:
            while True:
                if slot is None:
                    slot = await self._wait_for_ramp(loop)
                    if slot is None:
                        slot = await self._book_in_line(loop)
                delay = slot - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if gate.is_open(slot):
                    break
                # A 429 shut the gate over our slot while we slept. The slot is forfeit;
                # queue again behind the gate, which pushed `tat` past its end.
                slot = None
            self._grant(loop.time())
        finally:
            self._waiting -= 1

    def try_acquire(self) -> bool:
        """Take a permit if the gate is open, nobody is queued and a permit is due now.

        Example::

            if not limiter.try_acquire():   # in the running event loop
                await limiter.acquire()
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        now = loop.time()
        if self._queued or not self._gate.is_open(now):
            return False
        if self._ramp is not None and self._ramp_holds(now):
            return False  # acquire() waits for the ramp to widen
        if not self._pacer.take_due(now):
            return False  # not due yet: acquire() books it and sleeps
        self._grant(now)
        return True

    def _ramp_holds(self, now: float) -> bool:
        """Whether the start ramp holds a permit back; drops the ramp once it is over."""
        line = self._ramp
        assert line is not None
        held = line.holds(now, paced=self._pacer.rate is not None)
        if line.over:
            self._ramp = None
        return held

    def _end_ramp(self) -> None:
        if self._ramp is not None:
            self._ramp.end()
            self._ramp = None

    async def _wait_for_ramp(self, loop: asyncio.AbstractEventLoop) -> float | None:
        """Wait while the start ramp holds permits back; None once it no longer applies."""
        line = self._ramp
        if line is None or self._pacer.rate is not None or not await line.wait(loop):
            return None
        return self._pacer.reserve(loop.time())

    async def _book_in_line(self, loop: asyncio.AbstractEventLoop) -> float:
        """Queue (FIFO) behind the pause gate and the horizon, then book a slot."""
        if self._line is None:
            self._line = asyncio.Lock()
        gate, pacer = self._gate, self._pacer
        self._queued += 1
        try:
            # Only the head of the line sleeps on a timer; the others wait on the lock, so
            # a permit costs O(1) wake-ups however long the line is.
            async with self._line:
                ramped = False  # whether the ramp has granted our permit
                while True:
                    now = loop.time()
                    if not gate.is_open(now):
                        await asyncio.sleep(gate.pause_until - now)
                        continue
                    line = self._ramp
                    if not ramped and line is not None and self._ramp_holds(now):
                        # Rare: the gate shut (a long Retry-After) before pacing began.
                        ramped = await line.wait(loop)
                        continue
                    slot = pacer.reserve(now)
                    if slot is not None:
                        return slot
                    # Our slot lies beyond the horizon: sleep until it comes within reach
                    # and look again, so a cut made meanwhile applies to us as well.
                    await asyncio.sleep(pacer.reachable_at() - now)
        finally:
            self._queued -= 1

    def _grant(self, now: float) -> None:
        self._permits += 1
        if self._adaptive:
            self._controller.on_grant(now)

    # -- feedback ----------------------------------------------------------------------

    def on_success(self) -> None:
        """Report a processed attempt; after a full window without a 429, grow the rate.

        Each call grows the rate by at most one step, so an idle spell is no credit.

        Example::

            limiter.on_success()   # in the running event loop, after each 2xx
        """
        if self._adaptive:
            # `_now` rebinds to the running loop; the controller reads it only when a
            # growth step may be due, so most successes touch no clock.
            self._controller.on_success(self._now)
            line = self._ramp
            if line is not None:
                line.on_success(self._now())  # the next waiters may go now

    def on_rate_limited(self, retry_after: float | None) -> None:
        """Report a 429: shut the pause gate for ``retry_after`` seconds, cut the rate.

        ``retry_after=None`` (no Retry-After sent) leaves the gate as it is.

        Example::

            limiter.on_rate_limited(2.0)    # a 429 with "Retry-After: 2"
            limiter.on_rate_limited(None)   # a 429 without one
        """
        check_retry_after(retry_after)
        now = self._now()
        self._rate_limited += 1
        gate = self._gate
        opened, window = gate.pause_until, self._controller.window
        # Not adaptive, every 429 counts as overload (there is nothing else to tell). A
        # long pause is overload for the rate too.
        overloaded = not self._adaptive or self._controller.on_rate_limited(
            now, gate_opened=opened, pause=long_pause(retry_after, window)
        )
        if retry_after and pauses_everyone(
            retry_after, overloaded=overloaded, now=now, opened=opened, window=window
        ):
            gate.shut_until(now + retry_after)
        if gate.pause_until > now:
            # The cut above (if any) has set the new pace: the gate releases at that pace.
            self._pacer.hold_until(gate.pause_until)
        if self._pacer.rate is not None:
            self._end_ramp()  # pacing has begun: whoever the ramp held books a slot

    def on_quota(self, limit: int, remaining: int, reset: float) -> None:
        """Learn the server's rate from its quota headers (adaptive limiters only).

        The refill rate is ``(limit - remaining) / reset``: the requests used up, won back
        in ``reset`` seconds. It caps the rate's growth; pacing starts at it (or comes down
        to it) once the server's bucket is empty. A full bucket tells no rate.

        Example::

            limiter = RateLimiter()
            limiter.on_quota(limit=60, remaining=0, reset=30.0)
            limiter.statistics().rate   # 2.0: 60 requests won back in 30 s
        """
        if not self._adaptive or remaining > limit or not reset > 0:
            return
        now = self._now()
        controller = self._controller
        rate = self._server_rate.read(limit, remaining, reset, now)
        if rate is None:
            return
        controller.on_server_rate(rate, remaining=remaining)
        pacer = self._pacer
        if controller.ceiling is None and pacer.rate is not None:
            # Mirror the server's bucket: its whole burst after an idle spell, never more
            # than it says is left now (the answers are a little stale; in-flight
            # requests count twice, which errs on the side of no 429s).
            if pacer.burst != limit:
                pacer.set_burst(limit)
            pacer.hold_to(now, remaining)
            self._end_ramp()  # pacing has begun: whoever the ramp held books a slot

    # -- the event loop ----------------------------------------------------------------

    def _now(self) -> float:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        return loop.time()

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._waiting or self._queued:
            raise EventLoopError(
                "this RateLimiter has waiters in another event loop; use one per loop"
            )
        # Another loop has another clock: times from the old one mean nothing here. The
        # rate learnt so far is kept.
        self._loop = loop
        self._line = None
        if self._ramp is not None:
            self._ramp = RampLine()  # times of the old clock mean nothing here
        self._pacer.forget_times()
        self._gate.forget_times()
        self._controller.forget_times()

    # -- state -------------------------------------------------------------------------

    def statistics(self) -> LimiterStatistics:
        """Return a snapshot of the limiter's state (safe from any thread).

        Example::

            RateLimiter(600, per=60).statistics().ceiling   # 10.0 (requests per second)
        """
        loop = self._loop
        return LimiterStatistics(
            rate=self._pacer.rate,
            ceiling=self._controller.ceiling,
            burst=self._pacer.burst,
            paused_for=0.0 if loop is None else self._gate.paused_for(loop.time()),
            permits=self._permits,
            waiting=self._waiting,
            rate_limited=self._rate_limited,
            cuts=self._controller.cuts,
        )

    def __repr__(self) -> str:
        stats = self.statistics()
        rate = "unpaced" if stats.rate is None else f"{stats.rate:g}/s"
        ceiling = "none" if stats.ceiling is None else f"{stats.ceiling:g}/s"
        return (
            f"<{type(self).__name__} rate={rate} ceiling={ceiling} burst={stats.burst}"
            f" paused_for={stats.paused_for:g}s waiting={stats.waiting}>"
        )

"""Outage detection: when the server is down, wait it out instead of failing prompts.

A connection error or a 5xx on one attempt is weather; the same on every attempt is an
outage, and retrying each prompt on its own schedule then turns a 3 s outage into
hundreds of failed prompts (each exhausts ``max_attempts`` against a dead host) and a
storm of connection attempts. `OutageGuard` is a client-wide circuit breaker:

* **closed** (normal): attempts go straight through; the guard only counts failed
  *retries* in a row (a connection error, a timeout or a 5xx on an attempt whose call
  had already failed; any other answer, even a 4xx or 429, proves the server is up and
  resets the count). First attempts do not count: a server that fails them and takes
  the retries (a per-request fault) is up; in an outage the retries fail too.
* **open**: after ``threshold`` such failures in a row, every attempt waits at the guard
  before it takes a slot or a permit, and one attempt at a time goes through as a
  *probe* (half-open). The first probe may go at once; after a failed probe the next
  waits ``probe_initial`` seconds, doubling up to ``probe_max``. Waiting attempts are
  not sent, so they do not count against any prompt's ``max_attempts``: an outage
  costs its duration plus at most one probe interval, not prompts.
* A probe that gets any answer other than a connection error or a 5xx closes the guard
  and every waiting attempt goes on (through the limiter's pacing as usual).

* An outage is not waited out for ever: once the guard has been open for
  ``max_outage`` seconds (120 s; 10 s while the server has never answered this client,
  which is a wrong URL or port more often than an outage), it stops holding attempts,
  and each prompt ends by its own ``max_attempts`` or deadline as without a guard.

The next probe is the held attempt whose call has sent the most attempts (first come,
first served among equals), and a call's first `FREE_PROBE_FAILURES` failed probes do
not count against its ``max_attempts``: in a real outage the probes rotate over the
held prompts and cost none of them anything, while a server that fails each prompt's
first attempts (a fault per request, not an outage) sees the same prompt probe again and
get through, which closes the guard at once. A call whose
`RetryPolicy` never waits (``RetryPolicy.for_tests()``) passes the guard untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math

import attrs

from ._exceptions import ValidationError

logger = logging.getLogger("flux_async")

__all__ = [
    "DEFAULT_MAX_OUTAGE",
    "DEFAULT_OUTAGE_THRESHOLD",
    "DEFAULT_PROBE_INITIAL",
    "DEFAULT_PROBE_MAX",
    "FREE_PROBE_FAILURES",
    "OutageGuard",
    "OutageStatistics",
]

#: Connection errors or 5xx in a row that open the guard. A server failing 30 % of its
#: attempts at random has a (0.3)**8 = 0.007 % chance per attempt of such a run; a dead
#: server reaches it with the first wave of a fan-out.
DEFAULT_OUTAGE_THRESHOLD = 8
#: Seconds between probes after the first failed one, doubling up to `DEFAULT_PROBE_MAX`.
DEFAULT_PROBE_INITIAL = 0.5
DEFAULT_PROBE_MAX = 4.0
#: Failed probes per call that do not count against its ``max_attempts``: enough to ride
#: out a long outage, few enough that a prompt the server always fails (poison) still ends.
FREE_PROBE_FAILURES = 3
#: Seconds an outage is waited out before attempts go through again and fail on their own.
DEFAULT_MAX_OUTAGE = 120.0
#: The same while the server has never answered: likelier a wrong URL than an outage.
_MAX_OUTAGE_NEVER_SEEN = 10.0


@attrs.frozen(kw_only=True)
class OutageStatistics:
    """A snapshot of an `OutageGuard`.

    ``open`` is True while attempts are held; ``outages`` counts times it opened,
    ``probes`` attempts sent as probes, ``waiting`` attempts held right now.

    Example::

        print(client.outage.statistics())
    """

    open: bool
    outages: int
    probes: int
    waiting: int
    failures_in_a_row: int


class OutageGuard:
    """Client-wide circuit breaker that holds attempts while the server is down.

    * ``threshold`` (8): failed retries in a row (connection errors, timeouts, 5xx) that
      open the guard;
    * ``probe_initial`` (0.5 s) and ``probe_max`` (4 s): the wait before the next probe
      after a failed one, doubling from the first to the second;
    * ``max_outage`` (120 s): how long attempts are held before they are let through to
      fail on their own (10 s at most while the server has never answered).

    `FluxClient` makes one; pass ``outage=OutageGuard(...)`` to tune it, or share one
    between clients that talk to the same server.

    Example::

        client = FluxClient(outage=OutageGuard(threshold=20, probe_max=2.0))
        print(client.outage)   # <OutageGuard closed failures_in_a_row=0>
    """

    __slots__ = (
        "_arrivals",
        "_failures",
        "_listeners",
        "_max_outage",
        "_next_probe_at",
        "_open",
        "_opened_at",
        "_outages",
        "_probe_delay",
        "_probe_initial",
        "_probe_max",
        "_probes",
        "_probing",
        "_queue",
        "_seen_up",
        "_threshold",
    )

    def __init__(
        self,
        threshold: int = DEFAULT_OUTAGE_THRESHOLD,
        *,
        probe_initial: float = DEFAULT_PROBE_INITIAL,
        probe_max: float = DEFAULT_PROBE_MAX,
        max_outage: float = DEFAULT_MAX_OUTAGE,
    ) -> None:
        if type(threshold) is not int or threshold < 1:
            raise ValidationError("threshold", threshold, "an integer >= 1")
        for name, value in (
            ("probe_initial", probe_initial),
            ("probe_max", probe_max),
            ("max_outage", max_outage),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValidationError(name, value, "a finite number of seconds > 0")
            if not 0 < value < math.inf:
                raise ValidationError(name, value, "a finite number of seconds > 0")
        self._threshold = threshold
        self._probe_initial = float(probe_initial)
        self._probe_max = max(float(probe_max), self._probe_initial)
        self._max_outage = float(max_outage)
        self._failures = 0
        self._open = False
        self._opened_at = 0.0
        self._seen_up = False
        self._probing = False
        self._next_probe_at = 0.0
        self._probe_delay = self._probe_initial
        self._outages = 0
        self._probes = 0
        # Held attempts as (rank, arrival); `_next_in_line` picks the next probe.
        self._queue: list[tuple[int, int]] = []
        self._arrivals = itertools.count()
        self._listeners: list[asyncio.Future[None]] = []

    @property
    def is_open(self) -> bool:
        """True while attempts are held because the server looks down.

        Example::

            if client.outage.is_open: print("server down, waiting")
        """
        return self._open

    @property
    def answered(self) -> bool:
        """True once the server has answered this client with anything but a 5xx. A
        fan-out whose prompt cannot reach a server that never has answered stops there
        (a wrong host or port, more likely than an outage at the very start).

        Example::

            if not client.outage.answered: print("nothing has answered this client yet")
        """
        return self._seen_up

    async def enter(self, rank: int = 0) -> bool:
        """Wait while the guard is open; True when this attempt goes as the probe.

        Callers check `is_open` first, so a closed guard costs no coroutine. The next
        probe is the waiter with the highest ``rank`` (first come first served among
        equals): the client ranks a call by the attempts it has sent, so a prompt that
        is failing its own first attempts (a per-request fault, not an outage) gets
        through them, while in a real outage the probes rotate. A True return must be
        followed by `on_success` / `on_failure` with ``probe=True``, or `abandon_probe`
        if the attempt ends without an answer (cancelled).

        Example::

            probe = await guard.enter(rank=attempts_sent) if guard.is_open else False
            response = await send(request)   # then guard.on_success(probe) or on_failure(probe)
        """
        loop = asyncio.get_running_loop()
        me = (rank, next(self._arrivals))
        self._queue.append(me)
        try:
            while self._open:
                now = loop.time()
                held_for = now - self._opened_at
                limit = self._max_outage if self._seen_up else _MAX_OUTAGE_NEVER_SEEN
                if held_for >= limit - 1e-6:  # (the same float noise as below)
                    return False
                if self._probing or self._next_in_line() is not me:
                    await self._changed(loop, limit - held_for)
                    continue
                delay = min(self._next_probe_at - now, limit - held_for)
                # Under a microsecond is the float noise of `_next_probe_at - now`: a loop
                # whose clock ticks in whole microseconds would never get past such a wait.
                if delay > 1e-6:
                    await self._changed(loop, delay)
                    continue
                self._probing = True
                self._probes += 1
                return True
            return False
        finally:
            self._queue.remove(me)
            if self._queue:
                self._notify()

    def _next_in_line(self) -> tuple[int, int]:
        # Highest rank, then earliest arrival. The line is at most a fan-out's workers
        # long and this runs only while the guard is open.
        return min(self._queue, key=lambda entry: (-entry[0], entry[1]))

    async def _changed(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        listener: asyncio.Future[None] = loop.create_future()
        self._listeners.append(listener)
        try:
            if timeout is None:
                await listener
            else:
                try:
                    async with asyncio.timeout(timeout):
                        await listener
                except TimeoutError:
                    pass
        finally:
            # Notified listeners have left the list already; a timed-out or cancelled
            # one has not.
            if not listener.done() or listener.cancelled():
                listener.cancel()
                with contextlib.suppress(ValueError):
                    self._listeners.remove(listener)

    def _notify(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            if not listener.done():
                listener.set_result(None)

    def on_success(self, probe: bool = False) -> None:
        """Report an attempt that got an answer other than a 5xx (the server is up).

        Example::

            guard.on_success(probe)   # a 2xx, 4xx or 429: closes an open guard
        """
        self._failures = 0
        self._seen_up = True
        if probe:
            self._probing = False
        if self._open:
            self._open = False
            self._probe_delay = self._probe_initial
            self._notify()
            logger.info(
                "the server answered again after %.1fs: attempts go on",
                asyncio.get_running_loop().time() - self._opened_at,
            )

    def on_failure(self, probe: bool = False, *, retry: bool = True) -> None:
        """Report a connection error, timeout or 5xx; ``retry``: the call had failed before.

        Only retries count towards opening the guard. A server that fails first attempts
        (a cold cache, a per-request fault) and takes the retries is up; in an outage the
        retries fail too, a moment later. First attempts neither count nor reset.

        Example::

            if response.status >= 500:   # or the attempt raised APIConnectionError
                guard.on_failure(probe, retry=attempts_sent > 1)
        """
        if not (retry or probe):
            return
        self._failures += 1
        if probe:
            self._probing = False
            if self._open:
                now = asyncio.get_running_loop().time()
                self._next_probe_at = now + self._probe_delay
                self._probe_delay = min(self._probe_max, 2.0 * self._probe_delay)
                self._notify()
            return
        if not self._open and self._failures >= self._threshold:
            self._open = True
            self._opened_at = asyncio.get_running_loop().time()
            self._outages += 1
            self._probe_delay = self._probe_initial
            # The first probe may go at once: a blip may already be over.
            self._next_probe_at = 0.0
            logger.info(
                "the server looks down (%d failed retries in a row): attempts wait, one "
                "probe at a time, for up to %gs",
                self._failures,
                self._max_outage if self._seen_up else _MAX_OUTAGE_NEVER_SEEN,
            )

    def abandon_probe(self) -> None:
        """The probe ended without an answer (cancelled): let the next one go.

        Example::

            if probe:   # the attempt was cancelled before its answer came
                guard.abandon_probe()
        """
        self._probing = False
        if self._open:
            self._notify()

    def statistics(self) -> OutageStatistics:
        """A frozen snapshot.

        Example::

            client.outage.statistics().outages
        """
        return OutageStatistics(
            open=self._open,
            outages=self._outages,
            probes=self._probes,
            waiting=len(self._queue),
            failures_in_a_row=self._failures,
        )

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<OutageGuard {state} failures_in_a_row={self._failures}>"

"""GCRA pacing: the arithmetic of one rate, with the clock passed in.

GCRA is the "virtual scheduling" form of a leaky bucket. One number, ``tat`` (the
theoretical arrival time), is the time the next permit would be due if requests came at
exactly ``rate``. With interval ``T = 1/rate`` and burst tolerance ``tau = (burst-1) * T``
a permit may go at ``tat - tau``; taking it moves ``tat`` on by ``T``. Waiters do not poll:
each books its slot and sleeps until exactly then, so N permits take (N-1)/rate seconds
however late the event loop wakes anyone.

`Pacer` holds only that arithmetic: no event loop, no clock of its own, no waiting. The
in-process limiter sleeps on the slots it hands out; a limiter sharing one quota across
processes keeps ``tat`` elsewhere and supplies a pacer of its own with the same
`set_rate` and `rate`, which is all the adaptive controller needs.
"""

from __future__ import annotations

from ._exceptions import ValidationError
from ._timing import NEVER, SLACK, check_positive

__all__ = ["DEFAULT_BURST", "DEFAULT_HORIZON", "Pacer"]

#: Permits that may go back to back after an idle spell (1: strictly paced).
DEFAULT_BURST = 1
#: Seconds: no permit is booked further ahead than this, so cuts reach queued waiters.
#: The first design said ~1 s; permits booked before a cut keep the old pace for up to this
#: long, which at 1 s drew a second of 429s after every cut in the storm benchmark.
DEFAULT_HORIZON = 0.25


class Pacer:
    """GCRA for one rate: which slot the next permit gets, given the time now.

    * ``rate``: permits per second; None for unpaced (every permit is due at once).
    * ``burst``: after an idle spell up to ``burst`` permits go back to back. A fresh pacer
      has no burst credit: it grants one permit at once and paces the rest.
    * ``horizon``: `reserve` books no slot more than this many seconds ahead; it returns
      None instead, and the caller asks again once `reachable_at` has come.

    Every method takes the time as a number (any clock, as long as it is one clock), so
    the arithmetic is tested with plain numbers.

    Example::

        pacer = Pacer(10.0, burst=2)
        pacer.reserve(0.0)                 # 0.0: a fresh pacer grants one at once...
        pacer.reserve(0.0)                 # 0.1: ...and paces the next, no startup burst
        pacer.take_due(0.15)               # False: the next slot (0.2) is not due yet
        pacer.set_rate(5.0, cut=True)      # slower: next slot a new interval after 0.1
        pacer.reserve(0.15)                # 0.3
        print(pacer)   # <Pacer rate=5/s burst=2 horizon=0.25s tat=0.7 last_slot=0.3>
    """

    __slots__ = ("_burst", "_horizon", "_interval", "_last_slot", "_rate", "_tat", "_tau")

    def __init__(
        self,
        rate: float | None = None,
        *,
        burst: int = DEFAULT_BURST,
        horizon: float = DEFAULT_HORIZON,
    ) -> None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValidationError("burst", burst, "an int >= 1")
        self._horizon = check_positive("horizon", horizon)
        self._burst = burst
        # `_interval` is 0.0 while unpaced: the hot path tests it rather than `_rate`.
        self._rate: float | None = None
        self._interval = 0.0
        self._tau = 0.0
        if rate is not None:
            self.set_rate(check_positive("rate", rate))
        self._tat: float | None = None  # None until the first booking
        self._last_slot = NEVER  # the latest slot booked (or unpaced grant)

    @property
    def rate(self) -> float | None:
        """Permits per second; None while unpaced."""
        return self._rate

    @property
    def burst(self) -> int:
        """Permits that may go back to back after an idle spell."""
        return self._burst

    @property
    def horizon(self) -> float:
        """Seconds: the furthest ahead a slot is booked."""
        return self._horizon

    @property
    def tat(self) -> float | None:
        """The theoretical arrival time of the next permit; None before the first booking."""
        return self._tat

    @property
    def last_slot(self) -> float:
        """The latest slot booked (or unpaced grant); -inf before the first."""
        return self._last_slot

    def set_rate(self, rate: float | None, *, cut: bool = False) -> None:
        """Pace at ``rate`` permits per second (> 0) from now on; None stops pacing.

        Growing (``cut=False``) needs no change to ``tat``: the next permit stays at least
        one old (longer) interval after the last, and only later ones come closer
        together. A cut (``cut=True``) applies from the last permit booked instead.
        """
        self._rate = rate
        if rate is None:
            # Unpaced again (a futile storm gave back the rate it had before): permits are
            # due at once, and pacing starts afresh from the next cut.
            self._interval = self._tau = 0.0
            self._tat = None
            return
        self._interval = 1.0 / rate
        self._tau = (self._burst - 1) * self._interval
        if cut and self._last_slot != NEVER:
            # The next permit goes a full new interval after the last one booked, with the
            # bucket full (`+ tau`), so a bigger `tau` cannot turn into an instant burst.
            # Permits already booked keep their slots; the horizon bounds how many there are.
            floor = self._last_slot + self._interval + self._tau
            if self._tat is None or self._tat < floor:
                self._tat = floor

    def reserve(self, now: float) -> float | None:
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
        elif slot - now > self._horizon + SLACK:
            return None
        # The next permit is due T after this one's theoretical time, not T after `now`:
        # a late wake-up shortens the next wait instead of delaying every later permit.
        self._tat = tat + self._interval
        self._last_slot = slot
        return slot

    def take_due(self, now: float) -> bool:
        """Book a slot for ``now`` if one is due now (always, while unpaced); else False."""
        if not self._interval:
            self._last_slot = now
            return True
        tat = self._tat
        if tat is not None and tat - self._tau > now:
            return False
        # Due now, so `reserve` books it for now: it is never beyond the horizon.
        self.reserve(now)
        return True

    def reachable_at(self) -> float:
        """When the next slot comes within the horizon (after `reserve` returned None)."""
        assert self._tat is not None, "reserve() returns None only once tat is set"
        return self._tat - self._tau - self._horizon

    def hold_until(self, until: float) -> None:
        """No slot before ``until``, and no burst credit at it (the pause gate shuts).

        The first permit after the gate goes at ``until`` and the rest follow at the paced
        rate, instead of everyone queued behind the gate at once; `+ tau` leaves no burst
        credit, however long the pause was. Unpaced, there is nothing to hold.
        """
        if not self._interval:
            return
        floor = until + self._tau
        if self._tat is None or self._tat < floor:
            self._tat = floor

    def set_burst(self, burst: int) -> None:
        """Let up to ``burst`` permits go back to back after an idle spell from now on (a
        server's stated bucket); pair it with `hold_to`, which caps what is due now.

        Example::

            pacer.set_burst(20)   # a server that takes 20 at once after an idle spell
        """
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValidationError("burst", burst, "an int >= 1")
        self._burst = burst
        self._tau = (burst - 1) * self._interval

    def hold_to(self, now: float, available: int) -> None:
        """At most ``available`` permits due back to back at ``now`` (a server said that
        many are left); the rest follow at the paced rate. Never makes more due.

        Example::

            pacer.hold_to(now, 0)   # nothing left: the next permit one interval on
        """
        if not self._interval:
            return
        floor = now + self._tau - (available - 1) * self._interval
        if self._tat is None or self._tat < floor:
            self._tat = floor

    def forget_times(self) -> None:
        """Drop ``tat`` and the last slot (a new clock: old times mean nothing); keep the rate."""
        self._tat = None
        self._last_slot = NEVER

    def __repr__(self) -> str:
        rate = "unpaced" if self._rate is None else f"{self._rate:g}/s"
        tat = "none" if self._tat is None else f"{self._tat:g}"
        return (
            f"<{type(self).__name__} rate={rate} burst={self._burst}"
            f" horizon={self._horizon:g}s tat={tat} last_slot={self._last_slot:g}>"
        )

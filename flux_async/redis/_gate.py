"""The pause gate over Redis, as one process knows it, on its own event loop's clock."""

from __future__ import annotations

from .._gate import PauseGate
from .._timing import NEVER

__all__ = ["SharedGate"]


class SharedGate:
    """The shared pause gate: shut until the later of ``seen`` and ``own``.

    The gate itself is a field of the state hash, on the Redis server's clock; every
    script's answer says when it opens (or last opened), which this process turns into
    ``seen`` on its own clock. ``own`` is a `PauseGate` its own 429s shut at once, before
    Redis has heard of them (and after, until Redis's copy is seen).

    Example::

        gate = SharedGate()
        gate.seen = 12.0             # an answer: the gate opens at 12.0 on our clock
        gate.own.shut_until(12.5)    # our 429's Retry-After
        gate.pause_until             # 12.5
        gate.paused_for(12.25)       # 0.25
    """

    __slots__ = ("own", "seen")

    def __init__(self) -> None:
        self.seen = NEVER
        self.own = PauseGate()

    @property
    def pause_until(self) -> float:
        """When the gate opens, or last opened; -inf if it was never shut."""
        return max(self.seen, self.own.pause_until)

    def paused_for(self, now: float) -> float:
        """Seconds left before the gate opens; 0.0 when it is open."""
        return max(0.0, self.pause_until - now)

    def forget_times(self) -> None:
        """Open the gate (a new clock: the times it knew mean nothing)."""
        self.seen = NEVER
        self.own.forget_times()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} seen={self.seen:g} own={self.own.pause_until:g}>"

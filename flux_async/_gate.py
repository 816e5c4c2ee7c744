"""The pause gate: shut until a time (a 429's Retry-After), open after it."""

from __future__ import annotations

from ._timing import NEVER, SLACK

__all__ = ["PauseGate", "long_pause", "pauses_everyone"]


class PauseGate:
    """Shut until ``pause_until``, open from then on; a shorter pause never shortens it.

    Times are plain numbers from the caller's clock. The in-process limiter keeps one per
    limiter; a limiter shared across processes keeps ``pause_until`` where all of them
    see it.

    Example::

        gate = PauseGate()
        gate.shut_until(12.5)
        gate.shut_until(11.0)      # a shorter Retry-After: still shut until 12.5
        gate.is_open(12.0)         # False
        gate.paused_for(12.0)      # 0.5
        gate.is_open(12.5)         # True
        print(gate)                # <PauseGate pause_until=12.5>
    """

    __slots__ = ("_pause_until",)

    def __init__(self) -> None:
        self._pause_until = NEVER

    @property
    def pause_until(self) -> float:
        """The time the gate opens; -inf if it was never shut."""
        return self._pause_until

    def is_open(self, now: float) -> bool:
        """Whether a permit may go at ``now`` (within the clock's slack)."""
        return now + SLACK >= self._pause_until

    def shut_until(self, until: float) -> None:
        """Keep the gate shut until ``until`` at least."""
        if until > self._pause_until:
            self._pause_until = until

    def paused_for(self, now: float) -> float:
        """Seconds left before the gate opens; 0.0 when it is open."""
        return max(0.0, self._pause_until - now)

    def forget_times(self) -> None:
        """Open the gate for good (a new clock: the old ``pause_until`` means nothing)."""
        self._pause_until = NEVER

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pause_until={self._pause_until:g}>"


def pauses_everyone(
    retry_after: float | None, *, overloaded: bool, now: float, opened: float, window: float
) -> bool:
    """Whether a 429 at ``now`` shuts the gate for everyone (else it delays only its retry).

    A tolerated 429 with a short Retry-After (jitter at a strict server's edge) makes only
    its own request wait: shutting the gate for everyone would cost a slot per 429.
    Overload, or a Retry-After longer than ``window`` (a spent quota), pauses everyone. A
    short pause is not renewed within a window of the gate's last opening (``opened``):
    the answers to the first permits after a pause would otherwise shut it again at once,
    again and again, letting one attempt a second through; those 429s wait their own
    Retry-After while the rate cut (once a window) does the slowing.

    Example::

        pauses_everyone(30.0, overloaded=False, now=5.0, opened=-math.inf, window=1.0)  # True
        pauses_everyone(0.5, overloaded=False, now=5.0, opened=-math.inf, window=1.0)   # False
    """
    if not retry_after:
        return False
    return long_pause(retry_after, window) > 0 or (overloaded and now - opened + SLACK >= window)


def long_pause(retry_after: float | None, window: float) -> float:
    """The seconds a 429 shuts the gate for everyone whatever the share of 429s: its
    Retry-After when longer than ``window`` (a spent quota, an empty bucket), else 0.

    Example::

        long_pause(5.0, window=1.0)   # 5.0
        long_pause(0.5, window=1.0)   # 0.0
    """
    return retry_after if retry_after and retry_after > window else 0.0

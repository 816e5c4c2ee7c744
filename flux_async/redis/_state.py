"""What one process knows of the shared hash, and the one way it runs a script on it.

Each controller must see every permit, success and 429 of every process. The scripts
keep running totals of all three; each process sends its own successes and 429s with
its next call, and feeds its controller what the others did since its previous answer
(`SharedState.call`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from .._adaptive import AdaptiveController
from .._timing import NEVER
from ._connection import Connection
from ._gate import SharedGate
from ._scripts import Script, as_text

__all__ = ["SharedRate", "SharedState"]

# The most events of other processes replayed into the controller from one answer (a
# process idle for long catches up on at most this many: more than a window holds).
_MAX_REPLAY: Final = 10_000
# The scripts' "never" for a time (the pause gate never shut, no 429 ever).
_NEVER_US: Final = -4503599627370496


class SharedRate:
    """The `RateTarget` each process's controller drives: the shared rate as last seen;
    setting it proposes the change to every process (``propose``, the feedback's).

    Example::

        rate = SharedRate(10.0, lambda rate, cut: print("propose", rate, cut))
        rate.set_rate(9.0, cut=True)   # propose 9.0 True
        rate.rate                      # 9.0 until an answer says otherwise
    """

    __slots__ = ("_propose", "rate")

    rate: float | None

    def __init__(self, rate: float | None, propose: Callable[[float | None, bool], None]) -> None:
        self.rate = rate
        self._propose = propose

    def set_rate(self, rate: float | None, *, cut: bool = False) -> None:
        """Take ``rate`` (None: unpaced) now and propose it to every process."""
        self.rate = rate
        self._propose(rate, cut)


class SharedState:
    """One process's view of the state hash, kept up to date by every script's answer.

    `call` runs a script with this process's unreported successes and 429s, then takes in
    the answer's header: the shared rate (into ``rate``), when the pause gate opens (into
    ``gate``, a `SharedGate`), the cuts so far (``cuts``), and the totals of all
    processes, whose difference from the previous answer's it replays into
    ``controller`` (if ``adaptive``). ``epoch`` is None until the first answer, and again
    after `forget` (a new clock, or Redis may have lost the hash): the next answer starts
    the count.

    Example::

        state = SharedState(conn, rate, controller, adaptive=True)
        state.count_success()
        reply = await state.call(FEEDBACK, [state_key], head, [])   # reports it
    """

    def __init__(
        self,
        conn: Connection,
        rate: SharedRate,
        controller: AdaptiveController,
        *,
        adaptive: bool,
    ) -> None:
        self.rate = rate
        self.gate = SharedGate()
        self.epoch: str | None = None
        self.cuts = 0
        # Redis failed since its last answer ("fail" mode warns once per outage).
        self.failing = False
        self._conn = conn
        self._controller = controller
        self._adaptive = adaptive
        self._ver = -1
        self._seen = (0, 0, 0)  # permits, successes, 429s of all processes
        self._unreported = [0, 0]  # own successes, 429s not yet counted in Redis

    @property
    def unreported_429s(self) -> int:
        """This process's 429s that Redis has not counted yet."""
        return self._unreported[1]

    def count_success(self) -> None:
        """Count one of this process's successes; the next call reports it."""
        self._unreported[0] += 1

    def count_rate_limited(self) -> None:
        """Count one of this process's 429s; the next call reports it."""
        self._unreported[1] += 1

    def forget(self) -> None:
        """Count afresh from the next answer (a new clock, or Redis lost the hash)."""
        self.epoch = None

    async def call(
        self, script: Script, keys: Sequence[str], head: list[object], tail: list[object]
    ) -> Any:
        """Run ``script`` with this process's unreported successes and 429s between
        ``head`` and ``tail``, and take in the answer's header.

        One call at a time per process: the answers then come in the order the scripts
        ran, so the totals in each, minus the last answer's and our own, are exactly what
        the other processes did in between.
        """
        conn = self._conn
        lock, loop = conn.lock, conn.loop
        assert lock is not None
        assert loop is not None
        async with lock:
            own_s, own_l = self._unreported
            self._unreported = [0, 0]
            try:
                reply = await script.run(conn.client, keys, [*head, own_s, own_l, *tail])
            except BaseException:
                self._unreported[0] += own_s  # not counted: report them next time
                self._unreported[1] += own_l
                raise
            self._absorb(reply, own_s, own_l, loop.time())
        return reply

    def _absorb(self, reply: Any, own_s: int, own_l: int, now: float) -> None:
        """Take in an answer's header (see _scripts.py); replay into the controller what
        the other processes did since the last answer."""
        epoch = as_text(reply[0])
        rate = float(as_text(reply[1]))
        pause_us, g, s, limited, limited_age_us, ver, cuts, granted = (int(x) for x in reply[2:10])
        self.failing = False
        # When the gate opens (or last opened), on this loop's clock: the controller
        # measures send rates only over time the gate was open.
        self.gate.seen = NEVER if pause_us <= _NEVER_US else now + pause_us / 1e6
        if epoch != self.epoch:
            # A new hash (first contact, or Redis lost its data): count from here.
            self.epoch = epoch
            self._ver = ver
            self.cuts = cuts
            self.gate.own.forget_times()
            self.rate.rate = None if rate <= 0 else rate
            others = (0, 0, 0)
        else:
            seen_g, seen_s, seen_l = self._seen
            others = (
                max(0, g - seen_g - granted),
                max(0, s - seen_s - own_s),
                max(0, limited - seen_l - own_l),
            )
            if ver >= self._ver:
                self._ver = ver
                self.cuts = cuts
                self.rate.rate = None if rate <= 0 else rate
        self._seen = (g, s, limited)
        if self._adaptive:
            # 429s reported more than a window ago (heard of only now, say after a pause
            # this process slept through) belong to a window that is over: they are no
            # evidence of overload now.
            fresh = 0 <= limited_age_us <= self._controller.window * 1e6
            self._replay(now, granted + others[0], others[1], others[2] if fresh else 0)

    def _replay(self, now: float, grants: int, successes: int, limited: int) -> None:
        """Tell the controller of permits (all), successes and 429s (other processes')."""
        controller = self._controller
        for _ in range(min(grants, _MAX_REPLAY)):
            controller.on_grant(now)
        if successes:

            def clock() -> float:
                return now

            for _ in range(min(successes, _MAX_REPLAY)):
                controller.on_success(clock)
        for _ in range(min(limited, _MAX_REPLAY)):
            controller.on_rate_limited(now, gate_opened=self.gate.pause_until)

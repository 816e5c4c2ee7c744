"""What one process tells every other through the FEEDBACK script: its 429s, the pauses
they call for, and its controller's rate changes.

Its 429s go at once (its successes ride along with its next booking), so the other
processes' controllers count them within a booking or two. The script applies at most
one cut and one growth step per window for everyone: the first proposal of a window
stands for all.
"""

from __future__ import annotations

import asyncio

from .._adaptive import AdaptiveController
from .._gate import long_pause, pauses_everyone
from ._connection import REDIS_ERRORS, Connection
from ._fallback import Fallback
from ._scripts import FEEDBACK, float_arg
from ._settings import LimiterConfig
from ._state import SharedState

__all__ = ["Feedback"]


class Feedback:
    """Sends this process's rate proposals, pauses and 429s to Redis, together, from one
    background task at a time.

    `propose` is what the controller's `SharedRate` calls; `on_rate_limited` takes a 429
    as the in-process limiter does and shuts the shared gate when it calls for a pause.

    Example::

        feedback = Feedback(config, conn, state, controller, fallback)
        feedback.on_rate_limited(loop.time(), retry_after=2.0)   # sent in the background
    """

    def __init__(
        self,
        config: LimiterConfig,
        conn: Connection,
        state: SharedState,
        controller: AdaptiveController,
        fallback: Fallback,
    ) -> None:
        self._config = config
        self._conn = conn
        self._state = state
        self._controller = controller
        self._fallback = fallback
        self._proposal: tuple[str, float] | None = None  # ("cut" | "grow", rate; 0 unpaced)
        self._pause_for = 0.0
        self._task: asyncio.Task[None] | None = None

    def propose(self, rate: float | None, cut: bool) -> None:
        """The controller set the rate: propose it to every process (a cut wins over a
        growth step not sent yet)."""
        value = 0.0 if rate is None else rate
        if cut:
            self._proposal = ("cut", value)
        elif self._proposal is None or self._proposal[0] != "cut":
            self._proposal = ("grow", value)
        self._send()

    def on_rate_limited(self, now: float, retry_after: float | None) -> None:
        """This process got a 429 at ``now`` (counted already): tell the controller, shut
        the gate for everyone if it calls for a pause, and send it all to Redis."""
        state = self._state
        gate_opened = state.gate.pause_until
        # The in-process rule: a long Retry-After, or an overload 429 not within a
        # window of the gate opening, pauses everyone (and a long one is overload).
        window = self._controller.window
        overloaded = not self._config.settings.adaptive or self._controller.on_rate_limited(
            now, gate_opened=gate_opened, pause=long_pause(retry_after, window)
        )
        if retry_after and pauses_everyone(
            retry_after, overloaded=overloaded, now=now, opened=gate_opened, window=window
        ):
            state.gate.own.shut_until(now + retry_after)
            self._pause_for = max(self._pause_for, float(retry_after))
        # The 429 goes to Redis at once (with the pause, and the cut if the controller
        # made one): the other processes' controllers count it within a booking or two.
        self._send()

    def _send(self) -> None:
        if self._task is None and self._conn.loop is not None:
            self._task = self._conn.spawn(self._run())

    async def _run(self) -> None:
        """Send the pending rate proposal, pause and 429s together, until none is left."""
        config = self._config
        state = self._state
        try:
            while self._proposal is not None or self._pause_for or state.unreported_429s:
                op, value = self._proposal or ("", 0.0)
                pause_for = self._pause_for
                self._proposal = None
                self._pause_for = 0.0
                if self._fallback.active:
                    return
                head: list[object] = [
                    config.ceiling_arg,
                    config.settings.burst,
                    float_arg(self._controller.window),
                    config.ttl_ms,
                    op,
                    float_arg(value),
                    float_arg(pause_for),
                ]
                try:
                    await state.call(FEEDBACK, [config.state_key], head, [])
                except REDIS_ERRORS as exc:
                    self._fallback.redis_failed(exc)
                    return
        finally:
            self._task = None

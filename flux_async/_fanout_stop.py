"""How a fan-out stops early: on a ``stop_on`` answer, which every other prompt would get
too, on a prompt that could not reach a server that has never answered (a wrong host or
port: every other prompt would fail the same way, each after its retries), or on the
first failure with ``fail_fast`` (``docs/design.md``, "The fan-out").
"""

from __future__ import annotations

import asyncio
import logging

from ._counters import Counters
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    BatchStoppedError,
    DeadlineExceededError,
    FluxError,
)
from ._fanout_results import GenerationResult
from ._outage import OutageGuard

__all__ = ["Stop", "fail_fast_error"]

logger = logging.getLogger("flux_async")


def fail_fast_error(result: GenerationResult) -> BaseException:
    """The error that ends a fail_fast fan-out, noting what happened to the rest.

    Example::

        raise fail_fast_error(result)
    """
    error = result.error
    assert error is not None
    error.add_note(
        f"fail_fast: prompt #{result.index} failed; the prompts still running were cancelled"
    )
    return error


class Stop:
    """Whether a fan-out has stopped, and why.

    `observe` sees each prompt's final error: the first whose status is in ``stop_on``,
    or (unless ``stop_on`` is empty) the first connection error while ``outage`` says
    the server has never answered, becomes `stopped_by`, and ``counters.halted`` is set
    so that no call sends again (each ends with `stopped_error`); prompts taken
    afterwards end unsent (`skip`). ``failure`` is the first failed result of a
    ``fail_fast`` drain.

    Example::

        stop = Stop(frozenset({401, 403, 404}), counters, client.outage)
        stop.observe(exc, index)
        if stop.stopped_by is not None: ...
    """

    __slots__ = (
        "_counters",
        "_index",
        "_not_sent",
        "_outage",
        "_statuses",
        "failure",
        "stopped_by",
    )

    def __init__(self, statuses: frozenset[int], counters: Counters, outage: OutageGuard) -> None:
        self._statuses = statuses
        self._counters = counters
        self._outage = outage
        self.stopped_by: APIError | None = None
        self._index = -1
        self._not_sent = 0
        self.failure: GenerationResult | None = None

    def observe(self, exc: FluxError, index: int) -> None:
        """Stop the fan-out when prompt ``index`` ended with a ``stop_on`` answer, or
        could not reach a server that has never answered."""
        if self.stopped_by is not None:
            return
        if isinstance(exc, APIStatusError) and exc.status_code in self._statuses:
            what = f"got {exc.status_code}"
        elif (
            isinstance(exc, APIConnectionError)
            and not isinstance(exc, DeadlineExceededError)  # the caller's own limit
            and self._statuses
            and not self._outage.answered
        ):
            what = "could not reach a server that has never answered"
            exc.add_note(
                "Check base_url: nothing has answered this client there (is the host, the "
                "port and the scheme right, and the server running?); every other prompt "
                "would fail the same way."
            )
        else:
            return
        self.stopped_by = exc
        self._index = index
        self._counters.halted = self.stopped_error
        logger.info(
            "stopping the batch: prompt #%d %s (%s); the prompts not sent yet will not be",
            index,
            what,
            exc,
        )

    def stopped_error(self, attempts: int) -> BatchStoppedError:
        """The error of a prompt the stop kept from being sent (again)."""
        reason = self.stopped_by
        assert reason is not None
        notes = " ".join(getattr(reason, "__notes__", ()))
        what = (
            "This prompt was not sent"
            if attempts == 0
            else f"This prompt was not retried after {attempts} attempt(s)"
        )
        why = (
            f"got an answer every prompt would get (stop_on={sorted(self._statuses)})"
            if isinstance(reason, APIStatusError)
            else "could not reach a server that has never answered this client"
        )
        return BatchStoppedError(
            f"{what}: the batch stopped when prompt #{self._index} {why}: "
            f"{type(reason).__name__}: {reason}{' ' + notes if notes else ''}",
            reason=reason,
            attempts=attempts,
        )

    async def skip(self) -> BatchStoppedError:
        """The error of a prompt taken after the stop: it ends at once, unsent."""
        self._not_sent += 1
        if self._not_sent % 256 == 0:
            # Draining a long input ends no other way: let the loop breathe meanwhile.
            await asyncio.sleep(0)
        return self.stopped_error(0)

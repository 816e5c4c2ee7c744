"""How a fan-out stops early: on a ``stop_on`` answer, which every other prompt would get
too, on a prompt that could not reach a server that has never answered (a wrong host or
port: every other prompt would fail the same way, each after its retries), on images
that cannot be saved for every prompt alike (a full or read-only disk, a denied
directory, an image host that fails every download), or on the first failure with
``fail_fast`` (``docs/design.md``, "The fan-out").
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Final

from ._counters import Counters
from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    BatchStoppedError,
    DeadlineExceededError,
    FluxError,
    ImageDownloadError,
    ImageSaveError,
    RateLimitError,
)
from ._fanout_results import GenerationResult
from ._outage import OutageGuard

__all__ = ["DOWNLOAD_FAILURES_TO_STOP", "Stop", "disk_error", "fail_fast_error"]

logger = logging.getLogger("flux_async")

#: Write errors every other prompt's images would get too: the disk (or the quota) is
#: full, the filesystem read-only, the directory not ours to write, an image larger than
#: the filesystem or the process's file size limit allows (images are alike in size).
_DISK_ERRNOS: Final = frozenset(
    code
    for code in (
        errno.ENOSPC,
        errno.EFBIG,
        getattr(errno, "EDQUOT", None),
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
    )
    if code is not None
)

#: Prompts in a row whose images could not be fetched (each after its retries), with no
#: prompt saved between them, that stop a fan-out: the image host fails them all (an
#: HTML page for every URL, URLs expired or signed for another client).
DOWNLOAD_FAILURES_TO_STOP: Final = 8


def disk_error(exc: BaseException) -> OSError | None:
    """The write error behind ``exc`` that every other save would get too (disk full,
    read-only, permission denied), or None.

    Example::

        disk_error(ImageSaveError("...")) is None
    """
    seen: BaseException | None = exc
    for _ in range(4):  # the error, its cause, and theirs: never a long chain
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in _DISK_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


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
    or (unless ``stop_on`` is empty) the first 429 asking for a wait longer than
    ``retry_after_max`` (a spent quota: the next request would get one too), the first
    connection error while ``outage`` says the server has never answered, the first
    image that could not be written for a reason every image would share (`disk_error`),
    or the last of `DOWNLOAD_FAILURES_TO_STOP` prompts in a row whose images could not be
    fetched (`saved` ends a row), becomes `stopped_by`, and ``counters.halted`` is set so
    that no call sends again (each ends with `stopped_error`); prompts taken afterwards end
    unsent (`skip`). ``failure`` is the first failed result of a ``fail_fast`` drain.

    Example::

        stop = Stop(frozenset({401, 403, 404}), counters, client.outage, 60.0)
        stop.observe(exc, index)
        if stop.stopped_by is not None: ...
    """

    __slots__ = (
        "_counters",
        "_failed_downloads",
        "_index",
        "_longest_wait",
        "_not_sent",
        "_outage",
        "_statuses",
        "failure",
        "stopped_by",
    )

    def __init__(
        self,
        statuses: frozenset[int],
        counters: Counters,
        outage: OutageGuard,
        longest_wait: float,
    ) -> None:
        self._statuses = statuses
        self._longest_wait = longest_wait  # the retry policy's retry_after_max
        self._counters = counters
        self._outage = outage
        self.stopped_by: FluxError | None = None
        self._index = -1
        self._not_sent = 0
        self._failed_downloads = 0  # prompts in a row, none saved between them
        self.failure: GenerationResult | None = None

    def saved(self) -> None:
        """A prompt's images were saved: the image host serves them."""
        self._failed_downloads = 0

    def report_save(self, index: int, error: FluxError | None) -> None:
        """How saving prompt ``index``'s images went, from a caller that saves them
        itself (`Fanout.report_save`)."""
        if error is None:
            self.saved()
        else:
            self.observe(error, index)

    def observe(self, exc: FluxError, index: int) -> None:
        """Stop the fan-out when prompt ``index`` ended with a ``stop_on`` answer, could
        not reach a server that has never answered, or could not save its images for a
        reason every prompt would share."""
        if self.stopped_by is not None or not self._statuses:
            return  # stopped already, or stop_on=(): nothing stops it
        if isinstance(exc, APIStatusError) and exc.status_code in self._statuses:
            what = f"got {exc.status_code}"
        elif isinstance(exc, RateLimitError) and self._spent_quota(exc):
            what = f"was asked to wait {exc.retry_after:g} s"
        elif isinstance(exc, ImageSaveError):
            if not self._save_stops(exc):
                return
            what = "could not save its images"
        elif (
            isinstance(exc, APIConnectionError)
            and not isinstance(exc, DeadlineExceededError)  # the caller's own limit
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

    def _spent_quota(self, exc: RateLimitError) -> bool:
        """Whether ``exc`` asks for a wait longer than the policy honours (then with the
        hint added): every other prompt would be asked the same (a spent daily or hourly
        quota), and each would take one permit a gate's pause to be told so."""
        wait = exc.retry_after
        if wait is None or wait <= self._longest_wait:
            return False
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + wait))
        exc.add_note(
            f"The server asked for {wait:g} s before the next request (until about "
            f"{until}), longer than retry_after_max ({self._longest_wait:g} s): this "
            "key's quota is likely spent, and every other prompt would be told the same. "
            "Rerun after then, or raise RetryPolicy(retry_after_max=...) to wait it out."
        )
        return True

    def _save_stops(self, exc: ImageSaveError) -> bool:
        """Whether ``exc`` (a prompt's images not saved) is one every prompt would get,
        with the hint that says what to do added to it."""
        disk = disk_error(exc)
        if disk is not None:
            where = f" ({disk.filename})" if disk.filename else ""
            if disk.errno == errno.EFBIG:
                fix = "raise the file size limit (ulimit -f)"
            elif disk.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                fix = "give a directory this process may write to"
            else:
                fix = "free space on that disk, or give a directory on another"
            exc.add_note(
                f"Writing images failed with {disk.strerror or disk}{where}: {fix}; every "
                "other prompt's images would fail the same way."
            )
            return True
        if not isinstance(exc, ImageDownloadError) or exc.url is None:
            return False  # a b64 image that is no image: this prompt's own trouble
        self._failed_downloads += 1
        if self._failed_downloads < DOWNLOAD_FAILURES_TO_STOP:
            return False
        exc.add_note(
            f"The images of {DOWNLOAD_FAILURES_TO_STOP} prompts in a row could not be "
            "fetched: check that the image URLs the server returns can be fetched from "
            "here (their host, an expiry shorter than the generation, a proxy); every "
            "other prompt's would fail the same way. Their URLs are kept on each result."
        )
        return True

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
        if isinstance(reason, RateLimitError) and reason.status_code not in self._statuses:
            why = "was asked to wait longer than retry_after_max, as every prompt would be"
        elif isinstance(reason, APIStatusError):
            why = f"got an answer every prompt would get (stop_on={sorted(self._statuses)})"
        elif isinstance(reason, ImageSaveError):
            why = "could not save its images for a reason every prompt would share"
        else:
            why = "could not reach a server that has never answered this client"
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

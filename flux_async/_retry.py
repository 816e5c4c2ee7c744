"""The retry policy: what is retried, how long to wait, and when to give up.

Users configure a frozen `RetryPolicy`; tenacity drives the loop behind it and never
appears in a public signature. The rules (all defaults are the ``DEFAULT_*`` constants):

* Retried: 408, 409, 429, 500, 502, 503, 504, connection errors and timeouts.
  Never: 400, 401, 403, 404, 413, 422, a malformed 2xx body, cancellation.
* 429 is counted apart from other failures: it means "not processed", so a call may
  meet up to ``max_rate_limited_attempts`` of them, while other failures stop the call
  after ``max_attempts`` attempts in all.
* Wait before a retry: the server's ``retry-after-ms`` or ``Retry-After`` (seconds or an
  HTTP date; a past date means 0) when it sent one, capped at ``retry_after_max`` plus up
  to 10 % positive jitter; otherwise full-jitter exponential backoff
  ``uniform(0, min(backoff_max, backoff_initial * 2 ** (failures - 1)))``.
* ``deadline`` bounds the whole call, waits included. A ``Retry-After`` longer than the
  time left fails at once with `RateLimitError` (its ``retry_after`` says how long).
* A client-wide `RetryBudget` (the AWS SDKs' "retry quota") stops retry storms: each
  non-429 retry spends tokens, each success refunds one; when it is empty failures
  surface instead of multiplying load. 429s spend nothing: the rate limiter's pause gate
  is what slows them down, and a prompt must never be lost to a 429 storm.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import attrs
import tenacity as _t

from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    DeadlineExceededError,
    RateLimitError,
)

__all__ = [
    "DEFAULT_BACKOFF_INITIAL",
    "DEFAULT_BACKOFF_MAX",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_RATE_LIMITED_ATTEMPTS",
    "DEFAULT_RETRY_AFTER_MAX",
    "DEFAULT_RETRY_STATUSES",
    "RetryBudget",
    "RetryBudgetStatistics",
    "RetryPolicy",
    "parse_retry_after",
]

logger = logging.getLogger("flux_async")

T = TypeVar("T")

DEFAULT_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
DEFAULT_MAX_ATTEMPTS = 4
DEFAULT_MAX_RATE_LIMITED_ATTEMPTS = 50
DEFAULT_BACKOFF_INITIAL = 0.5
DEFAULT_BACKOFF_MAX = 8.0
DEFAULT_RETRY_AFTER_MAX = 60.0
_RETRY_AFTER_JITTER = 0.1


def _positive(name: str) -> Callable[[object, object, float], None]:
    def check(_: object, __: object, value: float) -> None:
        if not value > 0:
            raise ValueError(f"{name}={value!r} is not allowed: it must be > 0")

    return check


def _at_least_one(name: str) -> Callable[[object, object, int], None]:
    def check(_: object, __: object, value: int) -> None:
        if type(value) is not int or value < 1:
            raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= 1")

    return check


def _check_deadline(_: object, __: object, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"deadline={value!r} is not allowed: seconds > 0, or None for none")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """When and how a failed attempt is retried. Immutable; change with ``attrs.evolve``.

    * ``max_attempts`` (4): attempts in all for one call, counting every failure but 429s.
    * ``max_rate_limited_attempts`` (50): 429 answers one call may meet before it raises
      `RateLimitError`; 429s are cheap for the server, so they get a larger allowance.
    * ``retry_statuses``: statuses that are retried (408, 409, 429, 500, 502, 503, 504).
    * ``backoff_initial`` (0.5 s) and ``backoff_max`` (8 s): full-jitter exponential
      backoff, ``uniform(0, min(backoff_max, backoff_initial * 2 ** (failures - 1)))``,
      used when the server sends no ``Retry-After``.
    * ``retry_after_max`` (60 s): the longest server-requested wait honoured as such.
    * ``deadline`` (None): seconds for the whole call, waits included.
    * ``wait`` (True): False makes every wait zero, for test suites (see `for_tests`).

    Example::

        policy = RetryPolicy(max_attempts=6, deadline=120)
        client = FluxClient(retry=policy)
        await client.generate("a fox", retry=attrs.evolve(policy, max_attempts=1))
    """

    max_attempts: int = attrs.field(
        default=DEFAULT_MAX_ATTEMPTS, validator=_at_least_one("max_attempts")
    )
    max_rate_limited_attempts: int = attrs.field(
        default=DEFAULT_MAX_RATE_LIMITED_ATTEMPTS,
        validator=_at_least_one("max_rate_limited_attempts"),
    )
    retry_statuses: frozenset[int] = attrs.field(
        default=DEFAULT_RETRY_STATUSES, converter=frozenset
    )
    backoff_initial: float = attrs.field(
        default=DEFAULT_BACKOFF_INITIAL, validator=_positive("backoff_initial")
    )
    backoff_max: float = attrs.field(
        default=DEFAULT_BACKOFF_MAX, validator=_positive("backoff_max")
    )
    retry_after_max: float = attrs.field(
        default=DEFAULT_RETRY_AFTER_MAX, validator=_positive("retry_after_max")
    )
    deadline: float | None = attrs.field(default=None, validator=_check_deadline)
    wait: bool = True

    @classmethod
    def for_tests(cls, **changes: object) -> RetryPolicy:
        """The default policy with every wait cut to zero, so test suites never sleep.

        Attempt counts and every decision stay as in production; a 429 is not reported
        to the limiter, so nothing pauses or slows down either.

        Example::

            client = FluxClient(base_url=emu.base_url, retry=RetryPolicy.for_tests())
        """
        return cls(wait=False, **changes)  # type: ignore[arg-type]

    @classmethod
    def never(cls) -> RetryPolicy:
        """A policy that makes exactly one attempt.

        Example::

            await client.generate("x", retry=RetryPolicy.never())
        """
        return cls(max_attempts=1, max_rate_limited_attempts=1)

    def backoff(self, failures: int) -> float:
        """Full-jitter exponential backoff before retry number ``failures`` (1-based).

        Example::

            RetryPolicy().backoff(3)  # uniform(0, min(8.0, 0.5 * 4))
        """
        ceiling = min(self.backoff_max, self.backoff_initial * 2.0 ** (failures - 1))
        return random.uniform(0.0, ceiling)

    def is_retryable(self, exc: APIError) -> bool:
        """Whether this error is worth another attempt (before counts and time are checked).

        Example::

            RetryPolicy().is_retryable(InternalServerError("x", status_code=503))  # True
        """
        if isinstance(exc, APIStatusError):
            return exc.status_code in self.retry_statuses
        # DeadlineExceededError is final by definition; other connection errors are not.
        return isinstance(exc, APIConnectionError) and not isinstance(exc, DeadlineExceededError)


@attrs.frozen(kw_only=True)
class RetryBudgetStatistics:
    """A snapshot of a `RetryBudget`.

    Example::

        client.retry_budget.statistics().tokens
    """

    tokens: float
    capacity: float
    spent: int
    refused: int


class RetryBudget:
    """Client-wide retry quota: retries spend tokens, successes refund them.

    Defaults follow the AWS SDKs' "standard" retry mode: ``capacity`` 500 tokens, a retry
    costs ``retry_cost`` 5 (``timeout_cost`` 10 after a timeout, which is the costliest
    failure for a struggling server), a success refunds ``success_refund`` 1. When a
    retry cannot be paid for, the failure is raised instead: a dying server sees the
    load fall instead of multiply. 429 retries are free (the pause gate slows them).

    Example::

        budget = RetryBudget(capacity=100)
        client = FluxClient(retry_budget=budget)
    """

    __slots__ = (
        "_tokens",
        "capacity",
        "refused",
        "retry_cost",
        "spent",
        "success_refund",
        "timeout_cost",
    )

    def __init__(
        self,
        capacity: float = 500,
        *,
        retry_cost: float = 5,
        timeout_cost: float = 10,
        success_refund: float = 1,
    ) -> None:
        for name, value in (
            ("capacity", capacity),
            ("retry_cost", retry_cost),
            ("timeout_cost", timeout_cost),
        ):
            if not value > 0:
                raise ValueError(f"{name}={value!r} is not allowed: it must be > 0")
        if not success_refund >= 0:
            raise ValueError(f"success_refund={success_refund!r} is not allowed: it must be >= 0")
        self.capacity = float(capacity)
        self.retry_cost = float(retry_cost)
        self.timeout_cost = float(timeout_cost)
        self.success_refund = float(success_refund)
        self._tokens = float(capacity)
        self.spent = 0
        self.refused = 0

    @property
    def tokens(self) -> float:
        """Tokens left.

        Example::

            if client.retry_budget.tokens < 50: print("server is struggling")
        """
        return self._tokens

    def try_spend(self, exc: APIError) -> bool:
        """Pay for retrying after ``exc``; False (and nothing spent) when it cannot.

        Example::

            if not budget.try_spend(exc): raise exc
        """
        cost = self.timeout_cost if isinstance(exc, APITimeoutError) else self.retry_cost
        if self._tokens < cost:
            self.refused += 1
            return False
        self._tokens -= cost
        self.spent += 1
        return True

    def on_success(self) -> None:
        """Refund one success's worth of tokens, up to the capacity.

        Example::

            budget.on_success()
        """
        if self._tokens < self.capacity:
            self._tokens = min(self.capacity, self._tokens + self.success_refund)

    def statistics(self) -> RetryBudgetStatistics:
        """A frozen snapshot of the budget.

        Example::

            print(budget.statistics())
        """
        return RetryBudgetStatistics(
            tokens=self._tokens, capacity=self.capacity, spent=self.spent, refused=self.refused
        )

    def __repr__(self) -> str:
        return f"<RetryBudget tokens={self._tokens:g}/{self.capacity:g} refused={self.refused}>"


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` may be seconds or an HTTP date; a date in the past means 0. Returns
    ``None`` when neither header is present or parseable.

    Example::

        parse_retry_after({"Retry-After": "2"})          # 2.0
        parse_retry_after({"retry-after-ms": "250"})     # 0.25
    """
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            ms = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(ms) and ms >= 0:
                return ms / 1000.0
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


class _CallState:
    """What one logical call has been through; shared by its attempts."""

    __slots__ = ("attempts", "final", "last_error", "other_failures", "rate_limited", "wait")

    def __init__(self) -> None:
        self.attempts = 0
        self.rate_limited = 0
        self.other_failures = 0
        self.wait = 0.0
        self.final = False
        self.last_error: APIError | None = None


async def _no_sleep(_: float) -> None:
    # Still yield to the loop, so a test that never sleeps still lets others run.
    await asyncio.sleep(0)


class _Retrier:
    """Runs one logical call under a policy; the client makes one per call."""

    __slots__ = ("_budget", "_deadline_at", "_label", "_loop", "_on_backoff", "_policy", "_state")

    def __init__(
        self,
        policy: RetryPolicy,
        budget: RetryBudget | None,
        label: str,
        on_backoff: Callable[[int], None] | None = None,
    ) -> None:
        self._on_backoff = on_backoff
        self._policy = policy
        self._budget = budget
        self._label = label
        self._state = _CallState()
        self._loop = asyncio.get_running_loop()
        self._deadline_at = None if policy.deadline is None else self._loop.time() + policy.deadline

    @property
    def attempts(self) -> int:
        return self._state.attempts

    def remaining(self) -> float | None:
        """Seconds left before the deadline, or None when there is none."""
        if self._deadline_at is None:
            return None
        return self._deadline_at - self._loop.time()

    def _decide(self, exc: APIError) -> bool:
        """Whether to retry after ``exc``; sets the wait. False leaves ``exc`` to raise."""
        state = self._state
        policy = self._policy
        state.last_error = exc
        exc.attempts = state.attempts
        if not policy.is_retryable(exc):
            return False
        retry_after: float | None = None
        if isinstance(exc, RateLimitError):
            state.rate_limited += 1
            if state.rate_limited >= policy.max_rate_limited_attempts:
                return False
            retry_after = exc.retry_after
        else:
            state.other_failures += 1
            if state.other_failures >= policy.max_attempts:
                return False
            if isinstance(exc, APIStatusError):
                retry_after = parse_retry_after(exc.headers)
            if self._budget is not None and not self._budget.try_spend(exc):
                exc.add_note(
                    "Not retried: the client's retry budget is empty "
                    "(too many failures recently); see RetryBudget."
                )
                return False
        if retry_after is not None:
            wait = min(retry_after, policy.retry_after_max)
            wait += wait * random.uniform(0.0, _RETRY_AFTER_JITTER)
        else:
            failures = state.other_failures or state.rate_limited
            wait = policy.backoff(failures)
        remaining = self.remaining()
        if remaining is not None and wait >= remaining:
            if isinstance(exc, RateLimitError) and retry_after is not None:
                # The server told us when to come back and it is past our deadline:
                # say so now rather than sleep into a certain failure.
                exc.add_note(
                    f"Not retried: Retry-After {retry_after}s is past the call's deadline "
                    f"({max(remaining, 0.0):.2f}s left)."
                )
                return False
            state.final = True
            return False
        state.wait = wait if policy.wait else 0.0
        return True

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Call ``attempt`` until it succeeds or the policy gives up, within the deadline."""
        if self._deadline_at is None:
            return await self._first_then_retries(attempt)
        try:
            async with asyncio.timeout_at(self._deadline_at):
                return await self._first_then_retries(attempt)
        except TimeoutError:
            raise self._deadline_error() from None

    async def _first_then_retries(self, attempt: Callable[[], Awaitable[T]]) -> T:
        self._state.attempts = 1
        try:
            return await attempt()
        except APIError as exc:
            return await self.resume(exc, attempt)

    async def resume(self, first: APIError, attempt: Callable[[], Awaitable[T]]) -> T:
        """Carry on after a first attempt the caller made itself (no deadline set)."""
        self._state.attempts = 1
        if not self._decide(first):
            raise self._final(first) from None
        return await self._retry_loop(attempt)

    def _final(self, exc: APIError) -> APIError:
        exc.attempts = self._state.attempts
        if self._state.final:
            error = self._deadline_error()
            error.__cause__ = exc
            return error
        return exc

    def _deadline_error(self) -> DeadlineExceededError:
        state = self._state
        last = f"; last error: {state.last_error}" if state.last_error is not None else ""
        return DeadlineExceededError(
            f"{self._label}: deadline of {self._policy.deadline}s passed after "
            f"{state.attempts} attempt(s){last}",
            attempts=state.attempts,
        )

    async def _retry_loop(self, attempt: Callable[[], Awaitable[T]]) -> T:
        state = self._state
        await self._sleep(state.wait)
        retrying = _t.AsyncRetrying(
            retry=_t.retry_if_exception(self._retry_predicate),
            stop=_t.stop_never,  # _decide stops us by declining to retry
            wait=self._wait,
            sleep=self._sleep,
            before=self._before,
            reraise=True,
        )
        try:
            return await retrying(attempt)
        except APIError as exc:
            raise self._final(exc) from None

    def _retry_predicate(self, exc: BaseException) -> bool:
        return isinstance(exc, APIError) and self._decide(exc)

    def _wait(self, _: _t.RetryCallState) -> float:
        return self._state.wait

    def _before(self, _: _t.RetryCallState) -> None:
        state = self._state
        state.attempts += 1
        last = state.last_error
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "%s: attempt %d after %s: %s",
                self._label,
                state.attempts,
                type(last).__name__,
                last,
            )

    async def _sleep(self, seconds: float) -> None:
        if not (seconds > 0 and self._policy.wait):
            await _no_sleep(seconds)
            return
        on_backoff = self._on_backoff
        if on_backoff is None:
            await asyncio.sleep(seconds)
            return
        # Tell the fan-out this worker is off the wire for a while.
        on_backoff(1)
        try:
            await asyncio.sleep(seconds)
        finally:
            on_backoff(-1)

"""The retry policy: what is retried, how long to wait, and when to give up.

Users configure a frozen `RetryPolicy`. Whether one failed attempt is retried, and after
how long, is decided by `decide_retry`, a pure function of the policy, the error, the
call's counts so far and the time left (``docs/design.md`` walks through it); the loop
that acts on the decision lives with the attempt (``_attempt.py``). The rules (all
defaults are the ``DEFAULT_*`` constants):

* Retried: 408, 409, 429, 500, 502, 503, 504, connection errors and timeouts.
  Never: 400, 401, 403, 404, 413, 422, a malformed 2xx body, cancellation.
* 429 is counted apart from other failures: it means "not processed", so a call may
  meet up to ``max_rate_limited_attempts`` of them, while other failures stop the call
  after ``max_attempts`` attempts in all.
* Wait before a retry: the server's ``retry-after-ms`` or ``Retry-After`` (seconds or an
  HTTP date; a past date means 0; garbage, negative and overflowing values count as
  absent) plus up to 10 % positive jitter; otherwise full-jitter exponential backoff
  ``uniform(0, min(backoff_max, backoff_initial * 2 ** (failures - 1)))``.
* A 429 whose ``Retry-After`` is longer than ``retry_after_max`` ends the call with
  `RateLimitError` (its ``retry_after`` is the server's value): the client will not wait
  that long, and the limiter's pause gate shuts for ``retry_after_max`` at most.
* ``deadline`` bounds the whole call, waits included. A ``Retry-After`` longer than the
  time left fails at once with `RateLimitError`.
* A client-wide `RetryBudget` (the AWS SDKs' "retry quota") stops retry storms: a non-429
  retry spends tokens, a first-try success refunds one, a call that succeeds after
  retries refunds what its retries cost. A lone `generate` whose retry the budget cannot
  pay for raises at once; in a fan-out the retry waits for tokens instead (with one
  unpaid probe at a time), so an empty budget slows a batch down but fails no prompt.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping

import attrs
from multidict import CIMultiDict, CIMultiDictProxy

from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    DeadlineExceededError,
    RateLimitError,
    ValidationError,
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
    "RetryDecision",
    "RetryPolicy",
    "call_policy",
    "decide_retry",
    "parse_retry_after",
]

DEFAULT_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
DEFAULT_MAX_ATTEMPTS = 4
DEFAULT_MAX_RATE_LIMITED_ATTEMPTS = 50
DEFAULT_BACKOFF_INITIAL = 0.5
DEFAULT_BACKOFF_MAX = 8.0
DEFAULT_RETRY_AFTER_MAX = 60.0
_RETRY_AFTER_JITTER = 0.1


def _finite_positive(name: str) -> Callable[[object, object, float], None]:
    def check(_: object, __: object, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError(name, value, "a finite number of seconds > 0")
        if not 0 < value < math.inf:
            raise ValidationError(name, value, "a finite number of seconds > 0")

    return check


def _at_least_one(name: str) -> Callable[[object, object, int], None]:
    def check(_: object, __: object, value: int) -> None:
        if type(value) is not int or value < 1:
            raise ValidationError(name, value, "an integer >= 1")

    return check


def _check_deadline(_: object, __: object, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValidationError("deadline", value, "a finite number of seconds > 0, or None")


def _statuses(value: object) -> frozenset[int]:
    # A string is iterable: frozenset("500") would silently become {"5", "0"}.
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValidationError(
            "retry_statuses", value, "a set of HTTP status codes such as {429, 500, 503}"
        )
    statuses = frozenset(value)
    for status in statuses:
        if type(status) is not int or not 100 <= status <= 599:
            raise ValidationError(
                "retry_statuses", value, "a set of integer HTTP status codes from 100 to 599"
            )
    return statuses


def _check_testing(_: object, __: object, value: bool) -> None:
    if type(value) is not bool:
        raise ValidationError("testing", value, "True or False")


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
    * ``retry_after_max`` (60 s): the longest server-requested wait honoured. A 429 asking
      for longer ends its call with `RateLimitError`, and shuts the pause gate for
      ``retry_after_max`` only, so no header can freeze the client.
    * ``deadline`` (None): seconds for the whole call, waits included.
    * ``testing`` (False): the switch for test suites (see `for_tests`). Every wait of
      the call is zero (backoff, ``Retry-After``, the outage guard) and the limiter is
      not told of 429s (it would pause or pace the test); attempt counts and every
      decision stay as in production.

    Every bad value raises `ValidationError` naming the field.

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
        default=DEFAULT_RETRY_STATUSES, converter=_statuses
    )
    backoff_initial: float = attrs.field(
        default=DEFAULT_BACKOFF_INITIAL, validator=_finite_positive("backoff_initial")
    )
    backoff_max: float = attrs.field(
        default=DEFAULT_BACKOFF_MAX, validator=_finite_positive("backoff_max")
    )
    retry_after_max: float = attrs.field(
        default=DEFAULT_RETRY_AFTER_MAX, validator=_finite_positive("retry_after_max")
    )
    deadline: float | None = attrs.field(default=None, validator=_check_deadline)
    testing: bool = attrs.field(default=False, validator=_check_testing)

    @classmethod
    def for_tests(cls, **changes: object) -> RetryPolicy:
        """The default policy in testing mode: no call ever sleeps, so test suites are fast.

        Attempt counts and every decision stay as in production; the limiter is not told
        of 429s, so it neither pauses nor paces the test.

        Example::

            client = FluxClient(base_url=emu.base_url, retry=RetryPolicy.for_tests())
        """
        return cls(testing=True, **changes)  # type: ignore[arg-type]

    @classmethod
    def never(cls) -> RetryPolicy:
        """A policy that makes exactly one attempt.

        Example::

            await client.generate("x", retry=RetryPolicy.never())
        """
        return cls(max_attempts=1, max_rate_limited_attempts=1)

    def backoff_ceiling(self, failures: int) -> float:
        """The upper end of the backoff range before retry number ``failures`` (1-based).

        Example::

            RetryPolicy().backoff_ceiling(3)  # min(8.0, 0.5 * 4) == 2.0
        """
        # min() first: 2.0 ** 2000 overflows a float.
        if failures > 64:
            return self.backoff_max
        return min(self.backoff_max, self.backoff_initial * 2.0 ** (failures - 1))

    def backoff(self, failures: int) -> float:
        """Full-jitter exponential backoff before retry number ``failures`` (1-based).

        Example::

            RetryPolicy().backoff(3)  # uniform(0, min(8.0, 0.5 * 4))
        """
        return random.uniform(0.0, self.backoff_ceiling(failures))

    def is_retryable(self, exc: APIError) -> bool:
        """Whether this error is worth another attempt (before counts and time are checked).

        Example::

            RetryPolicy().is_retryable(InternalServerError("x", status_code=503))  # True
        """
        if isinstance(exc, APIStatusError):
            return exc.status_code in self.retry_statuses
        # DeadlineExceededError is final by definition; other connection errors are not.
        return isinstance(exc, APIConnectionError) and not isinstance(exc, DeadlineExceededError)


def call_policy(default: RetryPolicy, retry: object, deadline: float | None) -> RetryPolicy:
    """The policy of one call: ``retry`` when given (checked), else ``default``; with the
    call's ``deadline`` when given.

    Example::

        call_policy(client.retry, None, 30.0)  # the client's policy, 30 s per call
    """
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ValidationError("retry", retry, "a flux_async.RetryPolicy or None")
    policy = default if retry is None else retry
    if deadline is not None:
        policy = attrs.evolve(policy, deadline=deadline)
    return policy


@attrs.frozen(kw_only=True)
class RetryDecision:
    """What `decide_retry` concluded about one failed attempt.

    * ``retry``: make another attempt after ``wait`` seconds;
    * ``reason``: why, in words (it ends up in logs and in the error's notes);
    * ``deadline``: the call stops because its deadline leaves no time for the wait.

    Example::

        decision = decide_retry(RetryPolicy(), exc, failures=1, rate_limited=0)
        if decision.retry:
            await asyncio.sleep(decision.wait)
    """

    retry: bool
    wait: float = 0.0
    reason: str = ""
    deadline: bool = False


def decide_retry(
    policy: RetryPolicy,
    exc: APIError,
    *,
    failures: int,
    rate_limited: int,
    remaining: float | None = None,
    jitter: float | None = None,
) -> RetryDecision:
    """Decide whether to retry after ``exc``, and how long to wait first. A pure function.

    ``failures`` and ``rate_limited`` count the call's failed attempts so far, ``exc``
    included (non-429 failures and 429s apart); ``remaining`` is the seconds left before
    the call's deadline (None: no deadline); ``jitter`` is a number in [0, 1) that picks
    the point in the wait's range (drawn at random when None; tests pass their own).
    The retry budget is not consulted here: it is client-wide state, paid afterwards.

    Example::

        exc = RateLimitError("slow down", retry_after=2.0)
        decide_retry(RetryPolicy(), exc, failures=0, rate_limited=1, jitter=0.0)
        # RetryDecision(retry=True, wait=2.0, reason='429 with Retry-After 2s', ...)
    """
    if not policy.is_retryable(exc):
        return RetryDecision(retry=False, reason=f"{type(exc).__name__} is not retried")
    if jitter is None:
        jitter = random.random()
    if isinstance(exc, RateLimitError):
        refusal = _rate_limited_refusal(policy, exc, rate_limited)
    else:
        refusal = _failure_refusal(policy, failures)
    if refusal is not None:
        return RetryDecision(retry=False, reason=refusal)
    wait, reason = _wait(policy, exc, failures or rate_limited, jitter)
    if remaining is not None and wait >= remaining:
        return RetryDecision(
            retry=False,
            wait=wait,
            deadline=True,
            reason=f"a wait of {wait:.2f}s would pass the deadline ({max(remaining, 0):.2f}s left)",
        )
    return RetryDecision(retry=True, wait=wait, reason=reason)


def _rate_limited_refusal(
    policy: RetryPolicy, exc: RateLimitError, rate_limited: int
) -> str | None:
    """Why a 429 is not retried, or None when it may be."""
    if rate_limited >= policy.max_rate_limited_attempts:
        return f"max_rate_limited_attempts ({policy.max_rate_limited_attempts}) reached"
    retry_after = exc.retry_after
    if retry_after is not None and retry_after > policy.retry_after_max:
        return (
            f"Retry-After {retry_after:g}s is longer than retry_after_max "
            f"({policy.retry_after_max:g}s)"
        )
    return None


def _failure_refusal(policy: RetryPolicy, failures: int) -> str | None:
    """Why any other retryable failure is not retried, or None when it may be."""
    if failures >= policy.max_attempts:
        return f"max_attempts ({policy.max_attempts}) reached"
    return None


def _server_wait(policy: RetryPolicy, exc: APIError) -> float | None:
    """The wait the server asked for, if any, no longer than ``retry_after_max``."""
    if isinstance(exc, RateLimitError):
        # Not capped: one over retry_after_max was refused, never shortened.
        return exc.retry_after
    if isinstance(exc, APIStatusError):
        # A 503 may say when the server expects to be back.
        retry_after = parse_retry_after(exc.headers)
        if retry_after is not None:
            return min(retry_after, policy.retry_after_max)
    return None


def _wait(policy: RetryPolicy, exc: APIError, failures: int, jitter: float) -> tuple[float, str]:
    """The wait before the retry, and why: the server's wait plus up to 10 % jitter, or
    full-jitter backoff after ``failures`` failures."""
    retry_after = _server_wait(policy, exc)
    if retry_after is not None:
        wait = retry_after * (1.0 + _RETRY_AFTER_JITTER * jitter)
        return wait, f"{_describe(exc)} with Retry-After {retry_after:g}s"
    return policy.backoff_ceiling(failures) * jitter, f"{_describe(exc)}, backoff"


def _describe(exc: APIError) -> str:
    if isinstance(exc, APIStatusError):
        return str(exc.status_code)
    return type(exc).__name__


@attrs.frozen(kw_only=True)
class RetryBudgetStatistics:
    """A snapshot of a `RetryBudget`.

    ``spent`` counts retries paid for, ``refused`` retries it could not pay for (a lone
    call raised; a fan-out prompt waited), ``probes`` unpaid retries a fan-out sent one at
    a time while the budget was empty.

    Example::

        client.retry_budget.statistics().tokens
    """

    tokens: float
    capacity: float
    spent: int
    refused: int
    probes: int = 0


def _budget_number(name: str, value: object, *, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value < math.inf:
        raise ValidationError(name, value, "a finite number " + (">= 0" if zero_ok else "> 0"))
    if not (value >= 0 if zero_ok else value > 0):
        raise ValidationError(name, value, "a finite number " + (">= 0" if zero_ok else "> 0"))
    return float(value)


class RetryBudget:
    """Client-wide retry quota: retries spend tokens, successes earn them back.

    Defaults follow the AWS SDKs' "standard" retry mode: ``capacity`` 500 tokens, a retry
    costs ``retry_cost`` 5 (``timeout_cost`` 10 after a timeout, which is the costliest
    failure for a struggling server), a first-try success refunds ``success_refund`` 1,
    and a call that succeeds after retries refunds what its retries cost. So a healthy
    server that fails the odd attempt keeps the budget full, while a failing one drains it.

    When a retry cannot be paid for, a lone `FluxClient.generate` raises the failure (with
    a note saying so): a dying server sees the load fall instead of multiply. A fan-out
    never fails a prompt for it: the retry waits until successes refill the budget, and
    while it is empty one unpaid retry at a time probes the server. 429 retries are free
    (the limiter's pause gate slows them).

    Example::

        budget = RetryBudget(capacity=100)
        client = FluxClient(retry_budget=budget)
    """

    __slots__ = (
        "_probes",
        "_probing",
        "_tokens",
        "_waiters",
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
        self.capacity = _budget_number("capacity", capacity)
        self.retry_cost = _budget_number("retry_cost", retry_cost)
        self.timeout_cost = _budget_number("timeout_cost", timeout_cost)
        self.success_refund = _budget_number("success_refund", success_refund, zero_ok=True)
        self._tokens = self.capacity
        self.spent = 0
        self.refused = 0
        self._probes = 0
        self._probing = False
        # Fan-out retries waiting for tokens, first come first served.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def tokens(self) -> float:
        """Tokens left.

        Example::

            if client.retry_budget.tokens < 50: print("server is struggling")
        """
        return self._tokens

    def cost(self, exc: APIError) -> float:
        """What retrying after ``exc`` costs: 0 for a 429, ``timeout_cost`` after a timeout.

        Example::

            RetryBudget().cost(APITimeoutError("slow"))  # 10.0
        """
        if isinstance(exc, RateLimitError):
            return 0.0
        return self.timeout_cost if isinstance(exc, APITimeoutError) else self.retry_cost

    def try_spend(self, exc: APIError) -> bool:
        """Pay for retrying after ``exc``; False (and nothing spent) when it cannot.

        Example::

            if not budget.try_spend(exc): raise exc
        """
        return self.try_pay(self.cost(exc))

    def try_pay(self, cost: float) -> bool:
        """Pay ``cost`` tokens now if the budget has them and nobody waits; else False.

        Example::

            if budget.try_pay(budget.cost(exc)): ...  # retry
        """
        if not cost:
            return True
        if self._tokens < cost or self._waiters:
            self.refused += 1
            return False
        self._tokens -= cost
        self.spent += 1
        return True

    def on_success(self, refund: float = 0.0) -> None:
        """Refund a success: ``success_refund`` plus ``refund`` (what its retries cost).

        Example::

            budget.on_success()           # a first-try success
            budget.on_success(refund=10)  # a success after two paid retries
        """
        tokens = self._tokens + self.success_refund + refund
        self._tokens = tokens if tokens < self.capacity else self.capacity
        if self._waiters:
            self._wake()

    def _grant(self, cost: float) -> float | None:
        if self._tokens >= cost:
            self._tokens -= cost
            self.spent += 1
            return cost
        if not self._probing:
            self._probing = True
            self._probes += 1
            return 0.0
        return None

    async def pay_or_probe(self, cost: float) -> float:
        """Wait until ``cost`` tokens can be paid, first come first served.

        Returns ``cost`` once paid, or 0.0 when the retry may go as the one unpaid probe
        while the budget is empty; the caller then calls `end_probe` after that attempt.
        This is how a fan-out waits out an empty budget instead of failing prompts.

        Example::

            paid = await budget.pay_or_probe(budget.cost(exc))
            try:
                ...  # the retry
            finally:
                if not paid:
                    budget.end_probe()
        """
        if not self._waiters:
            granted = self._grant(cost)
            if granted is not None:
                return granted
        self.refused += 1
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            while True:
                await waiter
                # `_wake` wakes only the head of the line, so we are first in line now.
                granted = self._grant(cost)
                if granted is not None:
                    return granted
                waiter = loop.create_future()
                self._waiters[0] = waiter
        finally:
            self._waiters.remove(waiter)
            self._wake()

    def end_probe(self) -> None:
        """The unpaid probe granted by `pay_or_probe` has its answer: let the next go.

        Example::

            budget.end_probe()
        """
        self._probing = False
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        # Only the head of the line can go (FIFO); it looks again and leaves the line.
        if self._waiters:
            head = self._waiters[0]
            if not head.done():
                head.set_result(None)

    def statistics(self) -> RetryBudgetStatistics:
        """A frozen snapshot of the budget.

        Example::

            print(budget.statistics())
        """
        return RetryBudgetStatistics(
            tokens=self._tokens,
            capacity=self.capacity,
            spent=self.spent,
            refused=self.refused,
            probes=self._probes,
        )

    def __repr__(self) -> str:
        return f"<RetryBudget tokens={self._tokens:g}/{self.capacity:g} refused={self.refused}>"


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` may be seconds or an HTTP date; a date in the past means 0. Returns
    ``None`` when neither header is present or usable: garbage, negative, NaN, infinite
    and overflowing values all count as absent, never as an error.

    Example::

        parse_retry_after({"Retry-After": "2"})          # 2.0
        parse_retry_after({"retry-after-ms": "250"})     # 0.25
    """
    value = _header(headers, "retry-after-ms")
    if value is not None:
        ms = _seconds(value)
        if ms is not None:
            return ms / 1000.0
    value = _header(headers, "retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            return None
        delta = when.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, delta) if math.isfinite(delta) else None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """``headers[name]`` whatever its case (aiohttp's headers ignore case; a dict does not)."""
    value = headers.get(name)
    if value is None and not isinstance(headers, CIMultiDictProxy | CIMultiDict):
        for key, item in headers.items():
            if key.lower() == name:
                return item
    return value


def _seconds(value: str) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if 0 <= number < math.inf else None

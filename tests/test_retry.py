"""RetryPolicy arithmetic, Retry-After parsing and the retry budget (no network)."""

from __future__ import annotations

import asyncio
import email.utils
import math

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_async import (
    APIConnectionError,
    APITimeoutError,
    BadRequestError,
    DeadlineExceededError,
    InternalServerError,
    RateLimitError,
    RetryBudget,
    RetryPolicy,
    ValidationError,
)
from flux_async._retry import decide_retry, parse_retry_after


def test_retry_after_seconds_ms_and_dates() -> None:
    """retry-after-ms wins; Retry-After is seconds or an HTTP date; a past date is 0."""
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=1_000_000) == pytest.approx(30)
    assert parse_retry_after({"retry-after": date}, now=2_000_000) == 0.0
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-3"}) is None
    assert parse_retry_after({"retry-after-ms": "nan", "retry-after": "1"}) == 1.0


def test_full_jitter_backoff_bounds() -> None:
    """Backoff is uniform in [0, min(backoff_max, backoff_initial * 2**(failures-1))]."""
    policy = RetryPolicy(backoff_initial=0.5, backoff_max=3.0)
    for failures, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (10, 3.0)):
        waits = [policy.backoff(failures) for _ in range(300)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling * 0.8  # the range is really used


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (InternalServerError("x", status_code=500), True),
        (InternalServerError("x", status_code=503), True),
        (InternalServerError("x", status_code=501), False),
        (RateLimitError("x"), True),
        (BadRequestError("x", status_code=400), False),
        (APIConnectionError("x"), True),
        (APITimeoutError("x"), True),
        (DeadlineExceededError("x"), False),
    ],
)
def test_is_retryable(exc: Exception, retried: bool) -> None:
    """The default policy retries 408/409/429/5xx-listed, connection errors and timeouts only."""
    assert RetryPolicy().is_retryable(exc) is retried  # type: ignore[arg-type]


def test_policy_validation_names_field() -> None:
    """Impossible policy values raise ValidationError (a ValueError) naming the field."""
    with pytest.raises(ValueError, match="max_attempts=0"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="deadline=-1"):
        RetryPolicy(deadline=-1)
    with pytest.raises(ValueError, match="backoff_initial"):
        RetryPolicy(backoff_initial=0)


def test_policy_is_frozen_and_evolvable() -> None:
    """RetryPolicy is immutable; attrs.evolve makes per-call variants."""
    policy = RetryPolicy()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        policy.max_attempts = 9  # type: ignore[misc]
    assert attrs.evolve(policy, max_attempts=9).max_attempts == 9
    assert RetryPolicy.for_tests().testing is True
    assert RetryPolicy.never().max_attempts == 1


def test_budget_spends_refunds_and_refuses() -> None:
    """Retries cost 5 (timeouts 10), successes refund 1, and an empty budget refuses."""
    budget = RetryBudget(capacity=20)
    assert budget.try_spend(InternalServerError("x", status_code=500))
    assert budget.tokens == 15
    assert budget.try_spend(APITimeoutError("x"))
    assert budget.tokens == 5
    assert not budget.try_spend(APITimeoutError("x"))
    assert budget.tokens == 5
    assert budget.try_spend(APIConnectionError("x"))
    assert not budget.try_spend(APIConnectionError("x"))
    budget.on_success()
    assert budget.tokens == 1
    stats = budget.statistics()
    assert (stats.spent, stats.refused) == (3, 2)
    for _ in range(100):
        budget.on_success()
    assert budget.tokens == 20
    with pytest.raises(ValidationError, match="capacity"):
        RetryBudget(capacity=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"retry_statuses": "500"}, "retry_statuses"),
        ({"retry_statuses": {500, "503"}}, "retry_statuses"),
        ({"retry_statuses": {42}}, "retry_statuses"),
        ({"backoff_max": math.inf}, "backoff_max"),
        ({"retry_after_max": math.nan}, "retry_after_max"),
        ({"deadline": math.inf}, "deadline"),
        ({"deadline": True}, "deadline"),
        ({"max_attempts": 2.0}, "max_attempts"),
        ({"testing": "no"}, "testing"),
    ],
)
def test_every_bad_policy_value_is_a_validation_error(
    kwargs: dict[str, object], field: str
) -> None:
    """Strings, infinities and wrong types are refused up front, naming the field."""
    with pytest.raises(ValidationError) as info:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "0 JAN 0 2147483648:0 GMT"},
        {"Retry-After": "Mon, 01 Jan 99999 00:00:00 GMT"},
        {"Retry-After": "1e400"},
        {"Retry-After": "inf"},
        {"Retry-After": "-1"},
        {"retry-after-ms": "-5", "Retry-After": "junk"},
        {"retry-after-ms": "nan"},
    ],
)
def test_garbage_retry_after_counts_as_absent(headers: dict[str, str]) -> None:
    """Overflowing, negative, infinite and unparseable values never raise: they are None."""
    assert parse_retry_after(headers) is None


def test_retry_after_header_names_ignore_case() -> None:
    """A plain dict's 'Retry-After' is read like aiohttp's case-insensitive headers."""
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"Retry-After-Ms": "500"}) == 0.5


@given(st.text(max_size=40))
@settings(deadline=None, max_examples=300, database=None)
def test_retry_after_parsing_never_raises(value: str) -> None:
    """Any header text parses to None or a finite number of seconds >= 0."""
    for name in ("retry-after", "retry-after-ms"):
        seconds = parse_retry_after({name: value}, now=0.0)
        assert seconds is None or 0 <= seconds < math.inf


# -- decide_retry: every branch ---------------------------------------------------------

POLICY = RetryPolicy()


def server_error(status: int = 503, headers: dict[str, str] | None = None) -> InternalServerError:
    return InternalServerError("x", status_code=status, headers=headers)


def test_decide_retries_a_5xx_with_full_jitter_backoff() -> None:
    """A 5xx waits jitter * min(backoff_max, backoff_initial * 2**(failures-1))."""
    for failures, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0)):
        decision = decide_retry(
            POLICY, server_error(), failures=failures, rate_limited=0, jitter=0.5
        )
        assert decision.retry
        assert decision.wait == pytest.approx(ceiling * 0.5)
        assert "503" in decision.reason


def test_decide_stops_at_max_attempts() -> None:
    """The 4th non-429 failure of a call is its last (max_attempts counts all attempts)."""
    decision = decide_retry(POLICY, server_error(), failures=4, rate_limited=0, jitter=0.0)
    assert not decision.retry
    assert "max_attempts (4)" in decision.reason


def test_decide_honours_a_5xx_retry_after_capped() -> None:
    """A 503 with Retry-After waits that long (+ up to 10 %), capped at retry_after_max."""
    exc = server_error(headers={"retry-after": "3"})
    assert decide_retry(POLICY, exc, failures=1, rate_limited=0, jitter=1.0).wait == (
        pytest.approx(3.3)
    )
    long = server_error(headers={"retry-after": "999"})
    assert decide_retry(POLICY, long, failures=1, rate_limited=0, jitter=0.0).wait == 60.0


def test_decide_429_with_and_without_retry_after() -> None:
    """A 429 waits its Retry-After, or backs off by its 429 count when it sent none."""
    with_header = RateLimitError("x", retry_after=2.0)
    decision = decide_retry(POLICY, with_header, failures=0, rate_limited=1, jitter=0.0)
    assert (decision.retry, decision.wait) == (True, 2.0)
    bare = RateLimitError("x")
    decision = decide_retry(POLICY, bare, failures=0, rate_limited=3, jitter=1.0)
    assert (decision.retry, decision.wait) == (True, 2.0)


def test_decide_429_counts_apart_and_has_its_own_cap() -> None:
    """429s do not use up max_attempts; max_rate_limited_attempts ends them."""
    exc = RateLimitError("x", retry_after=0.1)
    assert decide_retry(POLICY, exc, failures=3, rate_limited=49, jitter=0.0).retry
    decision = decide_retry(POLICY, exc, failures=0, rate_limited=50, jitter=0.0)
    assert not decision.retry
    assert "max_rate_limited_attempts (50)" in decision.reason


def test_decide_a_retry_after_beyond_retry_after_max_ends_the_call() -> None:
    """A 429 asking for a day is not waited for: the call ends with it."""
    exc = RateLimitError("x", retry_after=86400.0)
    decision = decide_retry(POLICY, exc, failures=0, rate_limited=1, jitter=0.0)
    assert not decision.retry
    assert not decision.deadline
    assert "longer than retry_after_max" in decision.reason


def test_decide_connection_errors_and_timeouts_are_retried() -> None:
    """Connection errors and attempt timeouts back off; a deadline error is final."""
    for exc in (APIConnectionError("x"), APITimeoutError("x")):
        assert decide_retry(POLICY, exc, failures=1, rate_limited=0, jitter=0.0).retry
    final = decide_retry(POLICY, DeadlineExceededError("x"), failures=1, rate_limited=0)
    assert not final.retry


def test_decide_never_retries_a_4xx() -> None:
    """400 is not retried, whatever the counts."""
    decision = decide_retry(
        POLICY, BadRequestError("x", status_code=400), failures=1, rate_limited=0
    )
    assert not decision.retry
    assert decision.reason == "BadRequestError is not retried"


def test_decide_stops_when_the_wait_would_pass_the_deadline() -> None:
    """A wait at least as long as the time left ends the call, flagged as a deadline."""
    decision = decide_retry(POLICY, server_error(), failures=3, rate_limited=0, remaining=1.0,
                            jitter=0.6)  # fmt: skip
    assert (decision.retry, decision.deadline) == (False, True)
    assert decide_retry(
        POLICY, server_error(), failures=3, rate_limited=0, remaining=1.5, jitter=0.6
    ).retry


def test_decide_is_pure() -> None:
    """The same inputs give the same decision; nothing is stored anywhere."""
    exc = server_error()
    first = decide_retry(POLICY, exc, failures=2, rate_limited=0, jitter=0.25)
    assert first == decide_retry(POLICY, exc, failures=2, rate_limited=0, jitter=0.25)
    assert exc.attempts == 1


# -- the budget in a fan-out ------------------------------------------------------------


async def test_budget_waiters_get_tokens_first_come_first_served() -> None:
    """With the budget empty one retry goes as an unpaid probe; the rest queue in order."""
    budget = RetryBudget(capacity=5)
    assert await budget.pay_or_probe(5) == 5  # paid
    assert await budget.pay_or_probe(5) == 0.0  # the probe
    order: list[int] = []

    async def wait(k: int) -> None:
        order.append(await budget.pay_or_probe(5) and k)

    waiters = [asyncio.create_task(wait(k)) for k in (1, 2)]
    await asyncio.sleep(0)
    assert order == []
    assert not budget.try_pay(5)  # nobody jumps the queue
    budget.on_success(refund=4)  # 4 + 1 = 5 tokens: one retry's worth
    await asyncio.sleep(0)
    assert order == [1]
    budget.end_probe()  # the probe answered: the next may probe
    await asyncio.gather(*waiters)
    assert order == [1, 0]  # the second went as the new probe
    stats = budget.statistics()
    assert (stats.spent, stats.probes) == (2, 2)


async def test_a_cancelled_budget_waiter_leaves_no_trace() -> None:
    """Cancelling a queued retry removes it; the next in line still gets its turn."""
    budget = RetryBudget(capacity=5)
    await budget.pay_or_probe(5)
    await budget.pay_or_probe(5)
    first = asyncio.create_task(budget.pay_or_probe(5))
    second = asyncio.create_task(budget.pay_or_probe(5))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    budget.end_probe()
    assert await second == 0.0

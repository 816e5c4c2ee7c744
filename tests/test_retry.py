"""RetryPolicy arithmetic, Retry-After parsing and the retry budget (no network)."""

from __future__ import annotations

import email.utils

import attrs
import pytest

from flux_async import (
    APIConnectionError,
    APITimeoutError,
    BadRequestError,
    DeadlineExceededError,
    InternalServerError,
    RateLimitError,
    RetryBudget,
    RetryPolicy,
)
from flux_async._retry import parse_retry_after


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
    """Impossible policy values raise ValueError naming the field."""
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
    assert RetryPolicy.for_tests().wait is False
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
    with pytest.raises(ValueError, match="capacity"):
        RetryBudget(capacity=0)

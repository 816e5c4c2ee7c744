"""Tests for flux_async._outage on virtual time (looptime): the guard that waits out outages."""

from __future__ import annotations

import asyncio

import pytest

from flux_async import OutageGuard, ValidationError


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_closed_until_threshold_failures_in_a_row() -> None:
    """Failures open the guard only in an unbroken run; any answer resets the run."""
    guard = OutageGuard(threshold=3)
    guard.on_failure()
    guard.on_failure()
    guard.on_success()
    guard.on_failure()
    guard.on_failure()
    assert not guard.is_open
    guard.on_failure()
    assert guard.is_open
    assert guard.statistics().outages == 1


@pytest.mark.looptime
async def test_open_guard_holds_attempts_and_lets_one_probe_through() -> None:
    """While open, the first waiter probes at once and the others wait for its answer."""
    guard = OutageGuard(threshold=2)
    guard.on_failure()
    guard.on_failure()
    assert guard.is_open
    outcomes: list[tuple[int, bool, float]] = []

    async def attempt(k: int) -> None:
        outcomes.append((k, await guard.enter(), now()))

    tasks = [asyncio.create_task(attempt(k)) for k in range(3)]
    await asyncio.sleep(0)
    assert outcomes == [(0, True, 0.0)]
    assert guard.statistics().waiting == 2
    await asyncio.sleep(5)
    guard.on_success(probe=True)  # the server answered: everyone goes
    await asyncio.gather(*tasks)
    assert outcomes[1:] == [(1, False, 5.0), (2, False, 5.0)]
    assert not guard.is_open


@pytest.mark.looptime
async def test_failed_probes_back_off_and_rotate_between_waiters() -> None:
    """After a failed probe the next goes 0.5 s later, then 1 s, 2 s ...; first come first."""
    guard = OutageGuard(threshold=1, probe_initial=0.5, probe_max=2.0)
    guard.on_failure()
    probes: list[tuple[int, float]] = []

    async def attempt(k: int) -> None:
        while True:
            if await guard.enter():
                probes.append((k, now()))
                guard.on_failure(probe=True)
                await asyncio.sleep(0)  # back to the end of the line, like a retry
            else:
                return

    tasks = [asyncio.create_task(attempt(k)) for k in range(3)]
    await asyncio.sleep(6.0)
    guard.on_success()
    await asyncio.gather(*tasks)
    assert probes == [(0, 0.0), (1, 0.5), (2, 1.5), (0, 3.5), (1, 5.5)]
    assert guard.statistics().outages == 1


@pytest.mark.looptime
async def test_a_long_outage_stops_being_held() -> None:
    """After max_outage (10 s if the server never answered) attempts go through again."""
    guard = OutageGuard(threshold=1, max_outage=30.0)
    guard.on_failure()
    assert await guard.enter()  # the first probe, at once
    started = now()
    assert await guard.enter() is False  # the probe never answered: held until 10 s
    assert now() - started == pytest.approx(10.0)
    seen = OutageGuard(threshold=1, max_outage=30.0)
    seen.on_success()
    seen.on_failure()
    assert await seen.enter()
    started = now()
    assert await seen.enter() is False
    assert now() - started == pytest.approx(30.0)


@pytest.mark.looptime
async def test_a_cancelled_probe_lets_the_next_one_go() -> None:
    """A probe cancelled before its answer hands the probe to the next waiter."""
    guard = OutageGuard(threshold=1)
    guard.on_failure()
    assert await guard.enter()
    waiter = asyncio.create_task(guard.enter())
    await asyncio.sleep(1)
    assert not waiter.done()
    guard.abandon_probe()
    assert await waiter is True


@pytest.mark.looptime
async def test_cancelled_waiters_leave_no_trace() -> None:
    """Cancelling held attempts removes them from the line."""
    guard = OutageGuard(threshold=1)
    guard.on_failure()
    assert await guard.enter()
    tasks = [asyncio.create_task(guard.enter()) for _ in range(5)]
    await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert guard.statistics().waiting == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": 0}, "threshold"),
        ({"threshold": 2.5}, "threshold"),
        ({"probe_initial": 0}, "probe_initial"),
        ({"probe_max": float("inf")}, "probe_max"),
        ({"max_outage": "60"}, "max_outage"),
    ],
)
def test_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    """Bad settings raise ValidationError naming the field."""
    with pytest.raises(ValidationError) as info:
        OutageGuard(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


@pytest.mark.looptime
async def test_opening_and_closing_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """`-v` (INFO on the flux_async logger) says when attempts start to wait and when
    they go on, so a held batch is never silent."""
    caplog.set_level("INFO", logger="flux_async")
    guard = OutageGuard(threshold=2)
    guard.on_failure()
    guard.on_failure()
    await asyncio.sleep(3)
    guard.on_success()
    assert [r.getMessage() for r in caplog.records] == [
        "the server looks down (2 failed retries in a row): attempts wait, one probe at a "
        "time, for up to 10s",
        "the server answered again after 3.0s: attempts go on",
    ]

"""Tests for flux_async._limits, on virtual time (looptime): nothing here really sleeps.

Every looptime test starts its loop's clock at 0.0 and the clock jumps straight to the next
timer, in whole microseconds, so the times asserted below are exact virtual times.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable

import pytest

from flux_async._exceptions import ValidationError
from flux_async._limits import (
    DEFAULT_DECREASE_FACTOR,
    DEFAULT_PROBE_GROWTH,
    ConcurrencyLimit,
    Limiter,
    LimiterStatistics,
    RateLimiter,
)


def now() -> float:
    return asyncio.get_running_loop().time()


def rate_of(limiter: RateLimiter) -> float:
    rate = limiter.statistics().rate
    assert rate is not None
    return rate


async def grant_times(limiter: RateLimiter, n: int) -> list[float]:
    """Start ``n`` tasks at once; return the times their permits were granted, sorted."""
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        times.append(now())

    await asyncio.gather(*(one() for _ in range(n)))
    return sorted(times)


async def send(limiter: RateLimiter, n: int, gap: float = 0.0) -> None:
    """One caller taking ``n`` permits, sleeping ``gap`` between one and the next request."""
    for k in range(n):
        if k and gap:
            await asyncio.sleep(gap)
        await limiter.acquire()


# -- pacing ----------------------------------------------------------------------------


@pytest.mark.looptime
async def test_long_run_rate_is_exact_for_one_caller() -> None:
    """101 sequential permits at 10/s take exactly 10.0 virtual seconds."""
    limiter = RateLimiter(10)
    for _ in range(101):
        await limiter.acquire()
    assert now() == 10.0
    assert limiter.statistics().permits == 101


@pytest.mark.looptime
async def test_long_run_rate_is_exact_for_many_callers() -> None:
    """101 concurrent callers at 10/s are granted exactly 0.1 s apart, the last at 10.0."""
    times = await grant_times(RateLimiter(10), 101)
    assert times == pytest.approx([k / 10 for k in range(101)])
    assert times[-1] == 10.0


@pytest.mark.looptime
async def test_per_minute_rate() -> None:
    """rate=30, per=60 is one permit every 2 s, even with an interval beyond the horizon."""
    limiter = RateLimiter(30, per=60)
    assert limiter.statistics().ceiling == 0.5
    assert await grant_times(limiter, 4) == [0.0, 2.0, 4.0, 6.0]


@pytest.mark.looptime
async def test_no_startup_burst() -> None:
    """A fresh limiter grants one permit at once, then paces, whatever its burst."""
    limiter = RateLimiter(10, burst=5)
    first = limiter.acquire()
    with pytest.raises(StopIteration):  # returned without suspending
        first.send(None)
    assert await grant_times(limiter, 3) == pytest.approx([0.1, 0.2, 0.3])


@pytest.mark.looptime
async def test_burst_after_idle() -> None:
    """After an idle spell, exactly `burst` permits go back to back, then pacing resumes."""
    limiter = RateLimiter(10, burst=5)
    await limiter.acquire()
    await asyncio.sleep(10)
    times = await grant_times(limiter, 7)
    assert times == pytest.approx([10.0] * 5 + [10.1, 10.2])


@pytest.mark.looptime
async def test_late_callers_do_not_drift() -> None:
    """A caller that comes back late within its interval still gets the next exact slot."""
    limiter = RateLimiter(10)
    times = []
    for _ in range(11):
        await limiter.acquire()
        times.append(now())
        await asyncio.sleep(0.03)  # work between permits, shorter than the interval
    assert times == pytest.approx([k / 10 for k in range(11)])


@pytest.mark.looptime
async def test_unpaced_fast_path() -> None:
    """With no rate and no 429, acquire never suspends and virtual time never moves (once
    past the start ramp, which `tests/test_ramp.py` covers)."""
    for limiter in (RateLimiter(slow_start=False), RateLimiter(adaptive=False)):
        probe = limiter.acquire()
        with pytest.raises(StopIteration):
            probe.send(None)
        for _ in range(10_000):
            await limiter.acquire()
        stats = limiter.statistics()
        assert (stats.rate, stats.permits, stats.waiting) == (None, 10_001, 0)
    assert now() == 0.0


@pytest.mark.looptime
async def test_ceiling_never_exceeded_in_any_window() -> None:
    """Through bursts, 429s, pauses, cuts and recovery, no window of w s holds > burst + 10*w."""
    ceiling, burst = 10.0, 3
    limiter = RateLimiter(ceiling, burst=burst, increase=4.0)
    rng = random.Random(20240601)
    times: list[float] = []

    async def caller() -> None:
        for _ in range(25):
            await limiter.acquire()
            times.append(now())
            if rng.random() < 0.08:
                limiter.on_rate_limited(rng.choice([None, 0.0, 0.05, 0.4, 1.5]))
            else:
                limiter.on_success()
            await asyncio.sleep(rng.choice([0.0, 0.0, 0.0, 0.05, 0.3, 2.0]))

    await asyncio.gather(*(caller() for _ in range(20)))
    stats = limiter.statistics()
    assert stats.permits == 500
    assert stats.cuts >= 3  # the scenario did cut and recover, or it proves little
    times.sort()
    for i, start in enumerate(times):
        for j in range(i + 1, len(times)):
            assert j - i + 1 <= burst + (times[j] - start) * ceiling + 1e-6, (i, j)


# -- the horizon and the pause gate ----------------------------------------------------


@pytest.mark.looptime
async def test_cut_applies_to_queued_waiters() -> None:
    """Only ~horizon of permits is booked ahead, so a cut paces everyone queued beyond it."""
    limiter = RateLimiter(10, decrease_factor=0.7, horizon=1.0)
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        times.append(now())

    tasks = [asyncio.create_task(one()) for _ in range(50)]
    await asyncio.sleep(2.05)
    # Sent in the last second: the 10 permits at 1.1 .. 2.0, so 10/s; cut to 7/s.
    limiter.on_rate_limited(None)
    assert limiter.statistics().rate == pytest.approx(7.0)
    await asyncio.gather(*tasks)
    times.sort()
    # Booked before the cut (up to 2.05 + horizon): 0.0 .. 3.0, kept at 0.1 s apart.
    assert times[:31] == pytest.approx([k / 10 for k in range(31)])
    # Everyone else: one new interval after the last booked slot, then 1/7 s apart.
    assert times[31:] == pytest.approx([3.0 + k / 7 for k in range(1, 20)])


@pytest.mark.looptime
async def test_pause_gate_holds_everyone_then_releases_at_the_paced_rate() -> None:
    """No permit inside the pause (booked ones are re-booked); then one per interval."""
    limiter = RateLimiter(10, adaptive=False)
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        times.append(now())

    tasks = [asyncio.create_task(one()) for _ in range(30)]
    await asyncio.sleep(0.35)
    limiter.on_rate_limited(2.0)
    limiter.on_rate_limited(0.5)  # a shorter Retry-After never shortens the pause
    await asyncio.sleep(0.65)
    stats = limiter.statistics()
    assert stats.paused_for == pytest.approx(1.35)
    assert stats.waiting == 26
    await asyncio.gather(*tasks)
    times.sort()
    assert times[:4] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert times[4:] == pytest.approx([2.35 + k / 10 for k in range(26)])
    assert limiter.statistics().paused_for == 0.0


@pytest.mark.looptime
async def test_pause_gate_opens_without_a_burst() -> None:
    """However much burst credit accrued during a pause, the gate opens at the paced rate."""
    limiter = RateLimiter(10, burst=3, adaptive=False)
    await limiter.acquire()
    limiter.on_rate_limited(2.0)
    assert await grant_times(limiter, 5) == pytest.approx([2.0, 2.1, 2.2, 2.3, 2.4])


@pytest.mark.looptime
async def test_pause_gate_without_a_rate_releases_everyone_at_its_end() -> None:
    """Unpaced and not adaptive, the gate still holds everyone until pause_until."""
    limiter = RateLimiter(adaptive=False)
    limiter.on_rate_limited(3.0)
    assert await grant_times(limiter, 5) == [3.0] * 5
    limiter.on_rate_limited(None)  # no Retry-After: no pause
    assert await grant_times(limiter, 2) == [3.0, 3.0]


@pytest.mark.looptime
async def test_pause_gate_applies_to_a_new_caller() -> None:
    """A caller arriving during a pause gets its permit when the pause ends, not before."""
    limiter = RateLimiter(10, adaptive=False)
    await limiter.acquire()
    limiter.on_rate_limited(1.0)
    await limiter.acquire()
    assert now() == 1.0


# -- the adaptive throttle -------------------------------------------------------------


@pytest.mark.looptime
async def test_cut_happens_once_per_window() -> None:
    """Many 429s within one window make one cut; a 429 a full window later makes another."""
    limiter = RateLimiter(10)
    await send(limiter, 21)  # permits at 0.0, 0.1, ..., 2.0
    await asyncio.sleep(0.05)
    for _ in range(5):
        limiter.on_rate_limited(None)
    stats = limiter.statistics()
    assert (stats.cuts, stats.rate_limited) == (1, 5)
    assert stats.rate == pytest.approx(10 * DEFAULT_DECREASE_FACTOR)
    await asyncio.sleep(0.95)
    limiter.on_rate_limited(None)
    assert limiter.statistics().cuts == 1
    await asyncio.sleep(0.05)  # exactly one window after the first cut
    limiter.on_rate_limited(None)
    assert limiter.statistics().cuts == 2


@pytest.mark.looptime
async def test_cut_uses_the_measured_send_rate_when_lower() -> None:
    """Sending 2/s under a 10/s ceiling, a 429 cuts to 0.7 * 2 = 1.4/s."""
    limiter = RateLimiter(10, decrease_factor=0.7)
    await send(limiter, 7, gap=0.5)  # permits at 0.0, 0.5, ..., 3.0
    await asyncio.sleep(0.25)
    limiter.on_rate_limited(None)  # at 3.25: sent in (2.25, 3.25] are 2.5 and 3.0 -> 2/s
    assert limiter.statistics().rate == pytest.approx(1.4)


@pytest.mark.looptime
async def test_cut_uses_the_current_rate_when_lower() -> None:
    """A burst of 20 measured against a 10/s rate cuts to 0.7 * 10 = 7/s, not 14/s."""
    limiter = RateLimiter(10, burst=20, decrease_factor=0.7, tolerance=0)
    await limiter.acquire()
    await asyncio.sleep(5)
    assert await grant_times(limiter, 20) == [5.0] * 20
    await asyncio.sleep(0.5)
    limiter.on_rate_limited(None)
    assert limiter.statistics().rate == pytest.approx(7.0)


@pytest.mark.looptime
async def test_first_cut_without_a_ceiling_uses_the_measured_rate() -> None:
    """Unpaced at 20/s, a 429 starts pacing at 14/s, one interval after the last send."""
    limiter = RateLimiter(decrease_factor=0.7, tolerance=0)
    await send(limiter, 41, gap=0.05)  # permits at 0.0, 0.05, ..., 2.0
    await asyncio.sleep(0.025)
    limiter.on_rate_limited(None)  # at 2.025: (1.025, 2.025] holds 20 permits
    assert limiter.statistics().rate == pytest.approx(14.0)
    assert await grant_times(limiter, 2) == pytest.approx([2.0 + 1 / 14, 2.0 + 2 / 14])


@pytest.mark.looptime
async def test_min_rate_floor() -> None:
    """No cut goes below min_rate, nor above a ceiling lower than min_rate."""
    limiter = RateLimiter(10, min_rate=2.0)
    limiter.on_rate_limited(None)  # nothing sent in the last window: 0.7 * 0 -> floor
    assert limiter.statistics().rate == 2.0
    await asyncio.sleep(1)
    limiter.on_rate_limited(None)
    assert limiter.statistics().rate == 2.0
    per_minute = RateLimiter(3, per=60)  # 0.05/s, below the default min_rate of 0.1/s
    per_minute.on_rate_limited(None)
    assert per_minute.statistics().rate == pytest.approx(0.05)


@pytest.mark.looptime
async def test_additive_recovery_up_to_the_ceiling() -> None:
    """After a cut, each full window with a success adds 5 % of the ceiling; never above it."""
    limiter = RateLimiter(10, decrease_factor=0.7)
    await send(limiter, 21)
    await asyncio.sleep(0.05)
    limiter.on_rate_limited(None)  # 7.0/s
    rates = []
    for _ in range(100):  # a success every 0.1 s for 10 s
        await asyncio.sleep(0.1)
        limiter.on_success()
        rates.append(rate_of(limiter))
    assert rates[8] == pytest.approx(7.0)  # 0.9 s after the cut: not a full window yet
    assert sorted(set(rates)) == pytest.approx([7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0])
    assert rates.index(10.0) == 59  # 6 windows after the cut
    assert max(rates) == 10.0


@pytest.mark.looptime
async def test_recovery_step_is_clamped_to_the_ceiling() -> None:
    """A large increase lands on the ceiling, not above it."""
    limiter = RateLimiter(10, increase=2.0, min_rate=6.0)
    limiter.on_rate_limited(None)  # nothing sent: floor 6.0
    rates = []
    for _ in range(4):
        await asyncio.sleep(1)
        limiter.on_success()
        rates.append(limiter.statistics().rate)
    assert rates == [8.0, 10.0, 10.0, 10.0]


@pytest.mark.looptime
async def test_recovery_waits_a_full_window_after_any_429() -> None:
    """A 429 that makes no cut still restarts the window that recovery waits for."""
    limiter = RateLimiter(10, min_rate=5.0)
    limiter.on_rate_limited(None)  # cut at 0.0
    await asyncio.sleep(0.9)
    limiter.on_rate_limited(None)  # within the window: no cut, but no calm either
    await asyncio.sleep(0.2)
    limiter.on_success()  # 1.1 s after the cut, 0.2 s after the 429
    assert limiter.statistics().rate == 5.0
    await asyncio.sleep(0.8)
    limiter.on_success()  # a full window after the last 429
    assert limiter.statistics().rate == 5.5


@pytest.mark.looptime
async def test_without_a_ceiling_the_rate_probes_then_grows_additively() -> None:
    """No ceiling: after the first cut the rate grows x1.25 per window until the next 429,
    then by max(0.5, 10 % of the cut rate) per window, unbounded."""
    limiter = RateLimiter(decrease_factor=0.7, tolerance=0)
    await send(limiter, 41, gap=0.05)
    await asyncio.sleep(0.025)
    limiter.on_rate_limited(None)  # 0.7 * 20/s = 14/s, probing from here
    for _ in range(3):
        await asyncio.sleep(1)
        limiter.on_success()
    assert limiter.statistics().rate == pytest.approx(14.0 * DEFAULT_PROBE_GROWTH**3)
    probed = limiter.statistics().rate
    assert probed is not None
    await send(limiter, 30, gap=0.02)  # 50/s for 0.6 s, under the probed pace
    limiter.on_rate_limited(None)  # a paced cut: min(probed, sent) * 0.7; probing ends
    cut = limiter.statistics().rate
    assert cut is not None
    assert cut == pytest.approx(0.7 * min(probed, 30.0))
    for _ in range(50):
        await asyncio.sleep(1)
        limiter.on_success()
    stats = limiter.statistics()
    assert stats.ceiling is None
    assert stats.rate == pytest.approx(cut + 50 * max(0.5, 0.1 * cut))


@pytest.mark.looptime
async def test_not_adaptive_never_changes_the_rate() -> None:
    """adaptive=False: 429s pause and are counted, but never cut; successes never grow."""
    limiter = RateLimiter(10, adaptive=False)
    await send(limiter, 11)
    limiter.on_rate_limited(None)
    await asyncio.sleep(2)
    limiter.on_success()
    stats = limiter.statistics()
    assert (stats.rate, stats.cuts, stats.rate_limited) == (10.0, 0, 1)


# -- cancellation ----------------------------------------------------------------------


@pytest.mark.looptime
async def test_cancellation_leaves_no_waiter_behind() -> None:
    """Cancelled waiters (booked, queued or paused) leave waiting == 0 and the queue free."""
    limiter = RateLimiter(1, horizon=1.0)
    tasks = [asyncio.create_task(limiter.acquire()) for _ in range(6)]
    await asyncio.sleep(0.5)
    assert limiter.statistics().waiting == 5  # one booked at 1.0, four queued
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert limiter.statistics().waiting == 0
    # The cancelled booking at 1.0 is wasted, not handed on: the next slot is 2.0.
    await limiter.acquire()
    assert now() == 2.0
    limiter.on_rate_limited(5.0)
    paused = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(1)
    paused.cancel()
    with pytest.raises(asyncio.CancelledError):
        await paused
    assert limiter.statistics().waiting == 0
    assert limiter.statistics().permits == 2


# -- validation, statistics, repr ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rate": 0}, "rate"),
        ({"rate": -1.0}, "rate"),
        ({"rate": math.nan}, "rate"),
        ({"rate": math.inf}, "rate"),
        ({"rate": "10"}, "rate"),
        ({"rate": 10, "per": 0}, "per"),
        ({"burst": 0}, "burst"),
        ({"burst": 1.5}, "burst"),
        ({"burst": True}, "burst"),
        ({"decrease_factor": 0}, "decrease_factor"),
        ({"decrease_factor": 1}, "decrease_factor"),
        ({"window": 0}, "window"),
        ({"increase": 0}, "increase"),
        ({"min_rate": -0.1}, "min_rate"),
        ({"horizon": 0}, "horizon"),
    ],
)
def test_validation_errors_name_the_parameter(kwargs: dict[str, object], name: str) -> None:
    """Impossible settings raise a ValueError naming the parameter, value and what is allowed."""
    with pytest.raises(ValueError, match=rf"^{name}=.* is not allowed: ") as info:
        RateLimiter(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValidationError)
    assert info.value.field == name


@pytest.mark.parametrize("retry_after", [-1.0, math.nan, math.inf])
@pytest.mark.looptime
async def test_retry_after_must_be_a_finite_non_negative_number(retry_after: float) -> None:
    """on_rate_limited rejects a negative, NaN or infinite retry_after."""
    with pytest.raises(ValueError, match=r"^retry_after="):
        RateLimiter().on_rate_limited(retry_after)


@pytest.mark.looptime
async def test_statistics_and_repr_show_live_state() -> None:
    """statistics() and repr() report rate, ceiling, burst, pause, waiters and counters."""
    limiter = RateLimiter(600, per=60, burst=5, decrease_factor=0.7)
    fresh = "<RateLimiter rate=10/s ceiling=10/s burst=5 paused_for=0s waiting=0>"
    assert repr(limiter) == fresh
    await limiter.acquire()
    limiter.on_rate_limited(2.5)
    tasks = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
    await asyncio.sleep(0.5)
    # The cut: traffic began this instant, so there is no send rate to measure yet and the
    # cut is from the current rate: 0.7 * 10 = 7/s.
    assert limiter.statistics() == LimiterStatistics(
        rate=7.0, ceiling=10.0, burst=5, paused_for=2.0, permits=1, waiting=3,
        rate_limited=1, cuts=1,
    )  # fmt: skip
    assert repr(limiter) == "<RateLimiter rate=7/s ceiling=10/s burst=5 paused_for=2s waiting=3>"
    await asyncio.gather(*tasks)
    unpaced = "<RateLimiter rate=unpaced ceiling=none burst=1 paused_for=0s waiting=0>"
    assert repr(RateLimiter()) == unpaced


def test_limiter_is_the_abstract_interface() -> None:
    """Limiter cannot be instantiated; RateLimiter implements it."""
    with pytest.raises(TypeError):
        Limiter()  # type: ignore[abstract]
    assert isinstance(RateLimiter(), Limiter)


def test_built_outside_a_loop_and_reused_across_loops() -> None:
    """Nothing binds at construction; each new event loop gets fresh per-loop state."""
    limiter = RateLimiter()
    limit = ConcurrencyLimit(2)

    async def use() -> None:
        async with limit:
            await limiter.acquire()
        limiter.on_rate_limited(None)  # a cut: paced from here on, in this loop's clock

    asyncio.run(use())
    asyncio.run(use())
    stats = limiter.statistics()
    assert (stats.permits, stats.rate_limited) == (2, 2)
    assert limit.in_flight == 0


def test_use_from_another_loop_while_waiters_wait_is_refused() -> None:
    """Another loop has another clock: with waiters in one loop, use from another raises,
    and the waiters' state is left as it was."""
    limiter = RateLimiter(20)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        first.run_until_complete(limiter.acquire())
        waiter = first.create_task(limiter.acquire())  # booked 0.05 s later
        first.run_until_complete(asyncio.sleep(0))
        assert limiter.statistics().waiting == 1
        with pytest.raises(RuntimeError, match="waiters in another event loop"):
            second.run_until_complete(limiter.acquire())
        with pytest.raises(RuntimeError, match="waiters in another event loop"):
            second.run_until_complete(_report_429(limiter))
        first.run_until_complete(waiter)
        assert limiter.statistics().permits == 2
        second.run_until_complete(limiter.acquire())  # idle now: rebinds, fresh clock
        assert limiter.statistics().permits == 3
    finally:
        first.close()
        second.close()


async def _report_429(limiter: RateLimiter) -> None:
    limiter.on_rate_limited(None)


# -- ConcurrencyLimit ------------------------------------------------------------------


@pytest.mark.looptime
async def test_concurrency_limit_caps_in_flight() -> None:
    """At most `limit` tasks are inside at once; the rest wait their turn."""
    limit = ConcurrencyLimit(2)
    peak = 0

    async def one() -> None:
        nonlocal peak
        async with limit:
            peak = max(peak, limit.in_flight)
            await asyncio.sleep(1)

    await asyncio.gather(*(one() for _ in range(5)))
    assert (now(), peak, limit.in_flight, limit.limit) == (3.0, 2, 0, 2)
    await limit.acquire()
    assert repr(limit) == "<ConcurrencyLimit limit=2 in_flight=1>"
    limit.release()
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        limit.release()


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_concurrency_limit_validation(value: object) -> None:
    """ConcurrencyLimit needs an int >= 1 and says so."""
    with pytest.raises(ValueError, match=r"^limit=.* is not allowed: an int >= 1"):
        ConcurrencyLimit(value)  # type: ignore[arg-type]


@pytest.mark.looptime
async def test_a_lone_429_within_tolerance_does_not_cut() -> None:
    """One 429 among 40 sends in a window is retried, not punished; a few more cut."""
    limiter = RateLimiter(40)
    await send(limiter, 41, gap=0.025)  # 40/s for 1 s
    limiter.on_rate_limited(None)  # 1 of 40: within 5 %
    assert (limiter.statistics().rate, limiter.statistics().cuts) == (40.0, 0)
    limiter.on_rate_limited(None)
    limiter.on_rate_limited(None)  # 3 of 40: overload
    stats = limiter.statistics()
    assert stats.cuts == 1
    assert stats.rate == pytest.approx(40 * DEFAULT_DECREASE_FACTOR)
    assert stats.rate_limited == 3
    with pytest.raises(ValueError, match="tolerance"):
        RateLimiter(tolerance=1)


async def test_concurrency_limit_cancelled_waiters_leave_no_trace() -> None:
    """A waiter cancelled in line, or just as a slot was handed to it, leaks no slot."""
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire()
    assert not limit.try_acquire()
    queued = [asyncio.create_task(limit.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    queued[0].cancel()  # cancelled while waiting in line
    limit.release()  # hands the slot to queued[1]
    queued[1].cancel()  # ...which is cancelled before it runs: the slot moves on
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[2] is None
    assert limit.in_flight == 1  # queued[2] holds it
    limit.release()
    assert limit.in_flight == 0
    assert limit.try_acquire()


# -- no rate collapse --------------------------------------------------------------------


async def serve(limiter: RateLimiter, seconds: float, accept: Callable[[float], bool]) -> None:
    """One caller sending as fast as the limiter lets it for ``seconds``; ``accept(now)``
    says whether the server took the attempt (else it answers 429, no Retry-After)."""
    end = now() + seconds
    while now() < end:
        await limiter.acquire()
        if accept(now()):
            limiter.on_success()
        else:
            limiter.on_rate_limited(None)


@pytest.mark.looptime
async def test_a_window_after_a_pause_is_not_measured_as_the_send_rate() -> None:
    """A 429 just after the gate opens cuts from the current rate, not from ~0 sends."""
    limiter = RateLimiter(10)
    await send(limiter, 21)  # 10/s for 2 s
    limiter.on_rate_limited(2.0)  # a real overload: cut to 9/s, gate shut until 4.0
    assert rate_of(limiter) == pytest.approx(9.0)
    await limiter.acquire()  # at 4.0, as the gate opens
    await asyncio.sleep(0.05)
    limiter.on_rate_limited(None)
    # Measured over the last window, 1 permit would have cut to 0.9 * 1 = 0.9/s.
    assert rate_of(limiter) == pytest.approx(9.0 * DEFAULT_DECREASE_FACTOR)


@pytest.mark.looptime
async def test_no_cut_goes_below_half_the_recent_success_rate() -> None:
    """After 10 successes/s, even a steep cut keeps 5/s: successes are no overload."""
    limiter = RateLimiter(10, decrease_factor=0.1)
    await serve(limiter, 3.0, lambda _: True)
    limiter.on_rate_limited(None)
    assert rate_of(limiter) == pytest.approx(5.0, rel=0.1)


@pytest.mark.looptime
async def test_429s_that_do_not_fall_with_the_rate_stop_driving_cuts() -> None:
    """A server that refuses 2 of every 3 attempts whatever the rate does not collapse it.

    Once cuts have taken a quarter off the rate without the accepted share growing, the
    limiter stops cutting and gives the rate back, instead of falling to min_rate.
    """
    limiter = RateLimiter(40)
    counter = iter(range(10**9))
    await serve(limiter, 30.0, lambda _: next(counter) % 3 == 2)
    stats = limiter.statistics()
    assert stats.cuts <= 4
    assert rate_of(limiter) >= 0.75 * 40 * DEFAULT_DECREASE_FACTOR


@pytest.mark.looptime
async def test_a_server_at_capacity_is_still_found() -> None:
    """Against a 10/s server the limiter keeps cutting from 40/s down to about 10/s."""
    limiter = RateLimiter(40)
    accepted: list[float] = []

    def capacity(t: float) -> bool:
        while accepted and accepted[0] <= t - 1.0:
            accepted.pop(0)
        if len(accepted) < 10:
            accepted.append(t)
            return True
        return False

    await serve(limiter, 30.0, capacity)
    assert 7.0 <= rate_of(limiter) <= 13.0


@pytest.mark.looptime
async def test_429_storm_with_retry_after_does_not_collapse_an_unpaced_limiter() -> None:
    """Every prompt's first two attempts get 429 + Retry-After 1 s (the issue's probe).

    The gate's silences must not reset what the limiter learnt: once cuts prove futile
    it goes back to unpaced, and the 16 callers keep ~16 attempts on the wire per pause
    instead of ~1 (before: 0 prompts done after 120 s, rate at its 0.1/s floor).
    """
    limiter = RateLimiter()
    done = 0

    async def worker() -> None:
        nonlocal done
        while now() < 30.0:
            for attempt in range(3):
                await limiter.acquire()
                await asyncio.sleep(0.05)  # the round trip
                if attempt < 2:
                    limiter.on_rate_limited(1.0)
                    await asyncio.sleep(1.0)  # the prompt's own Retry-After
                else:
                    limiter.on_success()
                    done += 1

    await asyncio.gather(*(worker() for _ in range(16)))
    assert limiter.statistics().rate is None  # unpaced again: cuts were futile
    assert limiter.statistics().cuts <= 8
    assert done >= 16 * 30 / 2.2 * 0.8

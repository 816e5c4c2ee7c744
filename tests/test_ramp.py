"""The start ramp of a fresh unpaced limiter: the arithmetic, the limiter on virtual time,
and a web app's first spike against a rate-limited server over real sockets."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from flux_async import FluxClient, RateLimiter
from flux_async._exceptions import ValidationError
from flux_async._ramp import DEFAULT_DOUBLING, DEFAULT_START_WINDOW, StartRamp
from flux_async.emulator import Emulator


def now() -> float:
    return asyncio.get_running_loop().time()


def start_waiters(limiter: RateLimiter, n: int) -> tuple[list[asyncio.Task[None]], list[float]]:
    """``n`` tasks acquiring a permit each, and the list their grant times go into."""
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        times.append(now())

    return [asyncio.create_task(one()) for _ in range(n)], times


async def grant_times(limiter: RateLimiter, n: int) -> list[float]:
    tasks, times = start_waiters(limiter, n)
    await asyncio.gather(*tasks)
    return sorted(times)


# -- the arithmetic --------------------------------------------------------------------


def test_the_window_goes_at_once_then_the_allowance_doubles() -> None:
    ramp = StartRamp(window=4, doubling=0.1)
    assert [ramp.take(10.0) for _ in range(5)] == [True] * 4 + [False]
    assert ramp.due_at(10.0) == pytest.approx(10.0 + 0.1 * math.log2(5 / 4))
    assert not ramp.take(ramp.due_at(10.0) - 1e-6)
    assert ramp.take(ramp.due_at(10.0))  # the fifth, exactly when due
    # One doubling after the first permit, 8 in all.
    assert sum(ramp.take(10.1) for _ in range(10)) == 3


def test_successes_widen_the_allowance_by_two() -> None:
    ramp = StartRamp(window=2, doubling=1.0)
    assert [ramp.take(0.0) for _ in range(3)] == [True, True, False]
    ramp.on_success()
    assert [ramp.take(0.0) for _ in range(3)] == [True, True, False]
    # The clock's share is counted net of what successes already allowed.
    assert ramp.due_at(0.0) == pytest.approx(math.log2((5 - 2) / 2))


def test_discounted_time_does_not_grow_the_allowance() -> None:
    ramp = StartRamp(window=4, doubling=0.1)
    assert sum(ramp.take(0.0) for _ in range(5)) == 4
    ramp.discount(0.3)  # the loop could not run from 0.0 to 0.3
    assert ramp.due_at(0.3) == pytest.approx(0.3 + 0.1 * math.log2(5 / 4))
    assert sum(ramp.take(0.4) for _ in range(10)) == 4  # one doubling after 0.3: 8 in all


def test_the_ramp_finishes_when_it_holds_nothing_back() -> None:
    ramp = StartRamp(window=16, doubling=0.05)
    assert not ramp.finished(0.0)  # never used: not begun
    ramp.take(0.0)
    assert not ramp.finished(0.1)
    assert ramp.finished(0.05 * math.log2(4096 / 16) + 1e-9)
    assert "granted=1" in repr(ramp)


# -- the limiter, on virtual time ------------------------------------------------------


@pytest.mark.looptime
async def test_a_fresh_limiter_ramps_its_first_spike() -> None:
    limiter = RateLimiter()
    times = await grant_times(limiter, 64)
    window, doubling = DEFAULT_START_WINDOW, DEFAULT_DOUBLING
    expected = [0.0 if k < window else doubling * math.log2((k + 1) / window) for k in range(64)]
    # Virtual time ticks in whole microseconds: a permit may go up to 1 µs late.
    assert times == pytest.approx(expected, abs=2e-6)
    assert limiter.statistics().rate is None  # ramping is not pacing


@pytest.mark.looptime
async def test_a_success_lets_the_next_waiters_go_at_once() -> None:
    limiter = RateLimiter()
    for _ in range(DEFAULT_START_WINDOW):
        assert limiter.try_acquire()
    assert not limiter.try_acquire()
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    limiter.on_success()  # two more allowed: the first two waiters go without a timer
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [w.done() for w in waiters] == [True, True, False]
    assert now() == 0.0
    await waiters[2]
    assert now() > 0.0  # the third waited for the clock


@pytest.mark.looptime
async def test_waiters_the_allowance_has_room_for_all_go_in_one_turn() -> None:
    """A fast server's answers arrive many at a time: the waiters they make room for must
    leave together, in order. Let go one per turn of the loop, they would stay spread out
    and every later request would cost a turn of its own."""
    limiter = RateLimiter()
    for _ in range(DEFAULT_START_WINDOW):
        assert limiter.try_acquire()
    order: list[int] = []

    async def waiter(k: int) -> None:
        await limiter.acquire()
        order.append(k)

    tasks = [asyncio.create_task(waiter(k)) for k in range(12)]
    await asyncio.sleep(0)
    assert not order
    assert limiter.statistics().waiting == 12
    for _ in range(5):  # five answers in one turn: room for ten more
        limiter.on_success()
    await asyncio.sleep(0)  # one turn
    assert order == list(range(10))
    assert not limiter.try_acquire()  # no newcomer jumps the two still held
    await asyncio.gather(*tasks)
    assert order == list(range(12))


@pytest.mark.looptime
async def test_a_cancelled_waiter_hands_its_permit_on() -> None:
    limiter = RateLimiter()
    for _ in range(DEFAULT_START_WINDOW):
        assert limiter.try_acquire()
    tasks = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    limiter.on_success()  # room for two: the first two are let go
    tasks[0].cancel()  # before it could run: its permit goes to the third
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert tasks[0].cancelled()
    assert tasks[1].done()
    assert tasks[2].done()
    assert now() == 0.0
    assert limiter.statistics().permits == DEFAULT_START_WINDOW + 2


@pytest.mark.looptime
async def test_pacing_sends_whoever_the_ramp_held_to_book_a_slot() -> None:
    limiter = RateLimiter()
    for _ in range(DEFAULT_START_WINDOW):
        assert limiter.try_acquire()
    tasks, times = start_waiters(limiter, 5)
    await asyncio.sleep(0)
    limiter.on_quota(20, 0, 0.2)  # the server's bucket is empty: pace at 100/s
    await asyncio.gather(*tasks)
    assert times == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05], abs=2e-6)


@pytest.mark.looptime
async def test_pacing_ends_the_ramp() -> None:
    limiter = RateLimiter()
    for _ in range(DEFAULT_START_WINDOW):
        assert limiter.try_acquire()
    limiter.on_quota(20, 0, 0.2)  # the server's bucket is empty: pace at 100/s
    times = await grant_times(limiter, 5)
    assert times == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05], abs=2e-6)


@pytest.mark.looptime
async def test_without_slow_start_or_with_a_ceiling_nothing_ramps() -> None:
    assert await grant_times(RateLimiter(slow_start=False), 200) == [0.0] * 200
    assert await grant_times(RateLimiter(adaptive=False), 200) == [0.0] * 200
    # A ceiling paces from the first permit (GCRA, no startup burst): no ramp on top.
    times = await grant_times(RateLimiter(1000), 50)
    assert times == pytest.approx([k / 1000 for k in range(50)], abs=2e-6)
    with pytest.raises(ValidationError, match="slow_start"):
        RateLimiter(slow_start=1)  # type: ignore[arg-type]


@pytest.mark.looptime
async def test_once_finished_the_fast_path_never_suspends() -> None:
    limiter = RateLimiter()
    await grant_times(limiter, 200)
    await asyncio.sleep(1.0)  # the allowance is past anything a spike sends
    started = now()
    for _ in range(10_000):
        await limiter.acquire()
    assert now() == started


async def test_a_stalled_loop_does_not_count_toward_the_ramp() -> None:
    """A loop that could not run for 0.3 s read no 429 meanwhile: the time must not grow
    the allowance (counted, it would be 16 * 2**6: the whole spike at once)."""
    limiter = RateLimiter()
    tasks, times = start_waiters(limiter, 200)
    await asyncio.sleep(0)
    assert len(times) == DEFAULT_START_WINDOW  # the window went; 184 wait for the clock
    time.sleep(0.3)  # noqa: ASYNC251 - the stall itself (a blocking call in a handler)
    for _ in range(3):  # the late timer's turn, then the turn its waiters run in
        await asyncio.sleep(0)
    assert DEFAULT_START_WINDOW < len(times) <= 2 * DEFAULT_START_WINDOW
    await asyncio.gather(*tasks)
    assert len(times) == 200


# -- over real sockets -----------------------------------------------------------------


async def test_a_web_apps_first_spike_draws_few_429s() -> None:
    """200 handlers call one fresh default client at once; the server takes 100/s with a
    burst of 20. Sent all at once, 180 would come back 429."""
    async with (
        Emulator(rate_limit=100, burst=20, latency=0.2, record_requests=False) as emu,
        FluxClient(base_url=emu.base_url) as client,
    ):
        results = await asyncio.gather(*(client.generate(f"p{i}") for i in range(200)))
    assert len(results) == 200
    assert emu.stats.successes == 200
    assert emu.stats.rate_limited <= 20  # 10 %; a few in practice

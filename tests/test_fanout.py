"""gather_generate / iter_generate over real sockets against the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import pytest

from flux_async import (
    BadRequestError,
    DeadlineExceededError,
    FluxClient,
    ImageRequest,
    InternalServerError,
    Limiter,
    LimiterStatistics,
    MockTransport,
    RateLimiter,
    RetryBudget,
    RetryPolicy,
    TransportRequest,
    TransportResponse,
    ValidationError,
)
from flux_async._fanout import FanoutStatistics
from flux_async._workers import Workers
from flux_async.emulator import Emulator, Fault, FaultRates

from .conftest import API_KEY


async def test_gather_keeps_order_and_length(client: FluxClient, emulator: Emulator) -> None:
    """One result per prompt, in input order, each with its own images."""
    prompts = [f"prompt {i}" for i in range(60)]
    results = await client.gather_generate(prompts, concurrency=8)
    assert [r.index for r in results] == list(range(60))
    assert [r.prompt for r in results] == prompts
    assert all(r.ok and r.attempts == 1 for r in results)
    sent = sorted(seen.body["prompt"] for seen in emulator.requests if seen.body)
    assert sent == sorted(prompts)
    assert emulator.stats.successes == 60


async def test_per_prompt_errors_are_captured(emulator: Emulator) -> None:
    """A prompt the server rejects gets its error; the others still succeed."""
    async with FluxClient(
        api_key=API_KEY, base_url=emulator.base_url, retry=RetryPolicy.for_tests()
    ) as client:
        # The emulator requires aspect_ratio; omitting it makes the server answer 400.
        items = [
            ImageRequest(prompt=f"p{i}", aspect_ratio=None if i % 5 == 0 else "1:1")
            for i in range(20)
        ]
        results = await client.gather_generate(items, concurrency=4)
    failed = [r.index for r in results if not r.ok]
    assert failed == [0, 5, 10, 15]
    assert all(isinstance(results[i].error, BadRequestError) for i in failed)
    assert sum(r.ok for r in results) == 16
    assert emulator.stats.bad_requests == 4


async def test_fail_fast_cancels_the_rest(emulator: Emulator) -> None:
    """fail_fast raises the first final error and sends no more prompts."""
    async with FluxClient(
        api_key=API_KEY, base_url=emulator.base_url, retry=RetryPolicy.for_tests()
    ) as client:
        items = [ImageRequest(prompt="bad", aspect_ratio=None)] + [
            ImageRequest(prompt=f"p{i}") for i in range(200)
        ]
        with pytest.raises(BadRequestError) as info:
            await client.gather_generate(items, concurrency=1, fail_fast=True)
    assert "fail_fast" in "".join(info.value.__notes__)
    # One worker-slot plus the extra worker may have started, never the whole batch.
    assert emulator.stats.requests <= 3


async def test_input_is_consumed_lazily(client: FluxClient) -> None:
    """iter_generate pulls prompts as workers free up, not the whole input up front."""
    pulled = 0

    def prompts() -> Iterator[str]:
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield f"p{i}"

    seen = 0
    async with client.iter_generate(prompts(), concurrency=4) as results:
        async for result in results:
            assert result.ok
            seen += 1
            if seen == 20:
                break
    # Workers (concurrency + 1) plus the bounded result queue: O(concurrency), not O(n).
    assert pulled < 40


async def test_async_iterable_input(client: FluxClient, emulator: Emulator) -> None:
    """An async generator of prompts works, every prompt yields one result."""

    async def prompts() -> AsyncIterator[str]:
        for i in range(25):
            yield f"a{i}"

    indexes = [r.index async for r in client.iter_generate(prompts(), concurrency=3)]
    assert sorted(indexes) == list(range(25))
    assert emulator.stats.successes == 25


async def test_mapping_items_carry_their_own_fields(client: FluxClient, emulator: Emulator) -> None:
    """A mapping item's fields override the call's fields for that prompt only."""
    results = await client.gather_generate(
        ["plain", {"prompt": "wide", "aspect_ratio": "16:9"}], aspect_ratio="9:16"
    )
    assert all(r.ok for r in results)
    ratios = {
        seen.body["prompt"]: seen.body["aspect_ratio"] for seen in emulator.requests if seen.body
    }
    assert ratios == {"plain": "9:16", "wide": "16:9"}


async def test_n_is_split_per_prompt(client: FluxClient, emulator: Emulator) -> None:
    """n=15 sends two requests per prompt and joins 15 images in order."""
    results = await client.gather_generate(["x", "y"], n=15)
    assert [len(r.unwrap().data) for r in results] == [15, 15]
    assert emulator.stats.requests == 4
    assert sorted(seen.body["n"] for seen in emulator.requests if seen.body) == [5, 5, 10, 10]


async def test_bad_item_is_refused_before_sending(client: FluxClient, emulator: Emulator) -> None:
    """gather_generate validates every prompt first; a bad one names its index, nothing is sent."""
    with pytest.raises(ValidationError) as info:
        await client.gather_generate(["ok", "also ok", ""])
    assert "prompt #2 of 3" in "".join(info.value.__notes__)
    with pytest.raises(ValidationError, match="aspect_ratio"):
        client.iter_generate(["ok"], aspect_ratio="2:1")
    with pytest.raises(ValidationError, match="concurrency"):
        client.iter_generate(["ok"], concurrency=0)
    assert emulator.stats.requests == 0


async def test_input_error_is_raised_from_iteration(client: FluxClient) -> None:
    """An exception from the caller's own iterable reaches the caller."""

    def prompts() -> Iterator[str]:
        yield "one"
        raise RuntimeError("the prompt file is corrupt")

    with pytest.raises(RuntimeError, match="corrupt"):
        await client.gather_generate(prompts())  # materialised first: raises here
    with pytest.raises(RuntimeError, match="corrupt"):
        async for _ in client.iter_generate(prompts()):
            pass


async def test_progress_and_statistics(client: FluxClient) -> None:
    """on_progress sees every completion; the final statistics add up."""
    snapshots: list[FanoutStatistics] = []
    async with client.iter_generate(
        [f"p{i}" for i in range(30)], concurrency=5, on_progress=snapshots.append
    ) as results:
        async for _ in results:
            pass
        final = results.statistics()
    assert [s.done for s in snapshots] == list(range(1, 31))
    assert (final.submitted, final.done, final.succeeded, final.failed) == (30, 30, 30, 0)
    assert final.in_flight == 0


def _flux_tasks_since(before: set[asyncio.Task[object]]) -> list[asyncio.Task[object]]:
    """Tasks started since ``before`` that run flux_async code (the emulator's own handler
    tasks share the loop and are left out)."""
    return [
        t
        for t in asyncio.all_tasks() - before
        if "flux_async/_" in t.get_coro().cr_code.co_filename  # type: ignore[union-attr]
    ]


class _Gate(Limiter):
    """A limiter that lets the test know when ``target`` attempts are on their way."""

    def __init__(self, target: int) -> None:
        self.acquired = 0
        self.target = target
        self.reached = asyncio.Event()

    async def acquire(self) -> None:
        self.acquired += 1
        if self.acquired >= self.target:
            self.reached.set()

    def on_success(self) -> None:
        pass

    def on_rate_limited(self, retry_after: float | None) -> None:
        pass

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(
            rate=None,
            ceiling=None,
            burst=1,
            paused_for=0.0,
            permits=self.acquired,
            waiting=0,
            rate_limited=0,
            cuts=0,
        )


async def test_cancellation_leaks_nothing() -> None:
    """Cancelling mid-flight ends every task and returns every slot and connection."""
    async with Emulator(latency=60) as emu, FluxClient(base_url=emu.base_url) as client:
        gate = _Gate(target=8)
        fanout = client.iter_generate([f"p{i}" for i in range(100)], concurrency=8, limiter=gate)

        async def consume() -> None:
            async with fanout:
                async for _ in fanout:
                    pass

        before = asyncio.all_tasks()
        task = asyncio.create_task(consume())
        await gate.reached.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _flux_tasks_since(before) == []
        assert fanout.statistics().in_flight == 0
        assert gate.acquired == 8  # nothing new started after the cancel
        connector = client.transport.session.connector if client.transport.session else None
        assert connector is not None
        assert not connector._acquired  # every connection went back / was closed


async def test_batch_deadline_ends_everything_with_an_error() -> None:
    """After batch_deadline no prompt is left without a result, and no new one starts."""
    async with Emulator(latency=60) as emu, FluxClient(base_url=emu.base_url) as client:
        results = await client.gather_generate(
            [f"p{i}" for i in range(10)], concurrency=2, batch_deadline=0.3
        )
        assert len(results) == 10
        assert all(isinstance(r.error, DeadlineExceededError) for r in results)
        assert emu.stats.requests <= 3


async def test_empty_budget_slows_a_fanout_without_failing_prompts_early() -> None:
    """An empty budget makes a fan-out retry one unpaid probe at a time, never fail early.

    Every request fails here, so each prompt still ends by its own max_attempts (4), but
    once the 20 tokens are spent the retries queue for the budget instead of failing.
    """
    async with Emulator(faults=FaultRates(error_rate=1.0, error_status=503)) as emu:
        budget = RetryBudget(capacity=20)
        async with FluxClient(
            base_url=emu.base_url, retry=RetryPolicy.for_tests(), retry_budget=budget
        ) as client:
            results = await client.gather_generate([f"p{i}" for i in range(30)], concurrency=4)
        assert all(isinstance(r.error, InternalServerError) for r in results)
        assert all(r.attempts == 4 for r in results)
        assert emu.stats.requests == 30 * 4
        stats = budget.statistics()
        assert stats.spent == 4  # 20 tokens / 5 per retry
        assert stats.probes == 30 * 3 - 4  # every other retry went as the lone probe
        assert stats.tokens == 0


async def test_retries_that_succeed_give_their_cost_back() -> None:
    """30 % 5xx never drains the budget: each retried success refunds what it cost.

    Without the refund 200 prompts would spend ~430 tokens and earn back ~200.
    """
    faults = FaultRates(error_rate=0.3, error_status=500)
    async with Emulator(faults=faults, seed=7) as emu:
        budget = RetryBudget(capacity=100)
        async with FluxClient(
            base_url=emu.base_url,
            retry=RetryPolicy.for_tests(max_attempts=10),
            retry_budget=budget,
        ) as client:
            results = await client.gather_generate([f"p{i}" for i in range(200)], concurrency=4)
        assert all(r.ok for r in results)
        assert emu.stats.faults > 40
        stats = budget.statistics()
        assert stats.spent == emu.stats.faults
        assert (stats.probes, stats.refused) == (0, 0)
        assert budget.tokens == 100


async def test_rate_limit_ceiling_is_respected() -> None:
    """With rate_limit=20/s the server never sees more than ~21 requests in any 1 s window."""
    async with Emulator() as emu, FluxClient(base_url=emu.base_url) as client:
        results = await client.gather_generate(
            [f"p{i}" for i in range(30)], concurrency=16, rate_limit=20
        )
        assert all(r.ok for r in results)
        times = sorted(seen.time for seen in emu.requests)
    worst = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert worst <= 22  # 21 by arithmetic, one more for loopback jitter


async def test_429_storm_loses_nothing() -> None:
    """Against a 40 rps server, adaptive limiting and default retries complete every prompt."""
    async with Emulator(rate_limit=40, burst=4) as emu, FluxClient(base_url=emu.base_url) as client:
        results = await client.gather_generate([f"p{i}" for i in range(80)], concurrency=16)
        assert all(r.ok for r in results)
        assert emu.stats.successes == 80
        assert emu.stats.rate_limited > 0  # the storm really happened
        stats = client.limiter.statistics()
        assert stats.rate_limited > 0
        assert stats.cuts >= 1


async def test_shared_limiter_across_fanouts(emulator: Emulator) -> None:
    """Two fan-outs sharing one RateLimiter together stay under its ceiling."""
    limiter = RateLimiter(50)
    async with FluxClient(api_key=API_KEY, base_url=emulator.base_url) as client:
        a, b = await asyncio.gather(
            client.gather_generate([f"a{i}" for i in range(20)], limiter=limiter),
            client.gather_generate([f"b{i}" for i in range(20)], limiter=limiter),
        )
    assert all(r.ok for r in a + b)
    assert limiter.statistics().permits == 40
    times = sorted(seen.time for seen in emulator.requests)
    assert times[-1] - times[0] >= 39 / 50 * 0.9


async def test_backoff_frees_the_wire_for_other_prompts() -> None:
    """While prompts sleep in backoff, other prompts use their slots; in flight stays <= c."""
    async with Emulator(latency=0.01) as emu:
        emu.script(*[Fault.status(503, headers={"Retry-After": "0.3"})] * 2)
        async with FluxClient(base_url=emu.base_url) as client:
            results = await client.gather_generate([f"p{i}" for i in range(12)], concurrency=2)
        assert all(r.ok for r in results)
        keys = [seen.idempotency_key for seen in emu.requests]
        # The two failed calls retry last: everything else was sent while they slept.
        assert len(keys) == 14
        assert set(keys[-2:]) == set(keys[:2])
        assert len(set(keys[2:12])) == 10
        assert emu.stats.max_in_flight_seen <= 2


async def test_pause_gate_holds_every_worker() -> None:
    """One 429 with Retry-After pauses the whole fan-out: nothing is sent until it ends."""
    async with Emulator() as emu:
        emu.script(Fault.status(429, headers={"Retry-After": "0.6"}))
        async with FluxClient(base_url=emu.base_url) as client:
            results = await client.gather_generate([f"p{i}" for i in range(8)], concurrency=4)
        assert all(r.ok for r in results)
        times = [seen.time - emu.requests[0].time for seen in emu.requests]
    early = [t for t in times if t < 0.2]
    assert len(early) == 4  # the first wave was already on the wire
    assert all(t >= 0.55 for t in times[4:])  # everyone else waited for the gate
    assert len(times) == 9


async def test_gather_cancellation_leaks_nothing() -> None:
    """Cancelling gather_generate ends every worker task and returns every connection."""
    async with Emulator(latency=60) as emu, FluxClient(base_url=emu.base_url) as client:
        gate = _Gate(target=4)
        before = asyncio.all_tasks()
        task = asyncio.create_task(
            client.gather_generate([f"p{i}" for i in range(50)], concurrency=4, limiter=gate)
        )
        await gate.reached.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _flux_tasks_since(before) == []
        assert gate.acquired == 4
        assert client.transport.session is not None
        assert not client.transport.session.connector._acquired  # type: ignore[union-attr]


async def test_split_prompts_are_not_counted_as_retries(client: FluxClient) -> None:
    """n=11 makes two calls per prompt; statistics count no retries for them."""
    async with client.iter_generate(["a", "b"], n=11) as results:
        attempts = [r.attempts async for r in results]
        stats = results.statistics()
    assert attempts == [2, 2]
    assert stats.retries == 0


async def test_concurrency_beyond_the_pool_is_refused(emulator: Emulator) -> None:
    """concurrency above max_connections is refused up front with what to change."""
    async with FluxClient(base_url=emulator.base_url, max_connections=4) as client:
        with pytest.raises(ValidationError, match=r"max_connections=8"):
            client.iter_generate(["x"], concurrency=8)
    assert emulator.stats.requests == 0


async def test_breaking_out_without_async_with_stops_every_worker() -> None:
    """A dropped iterator (break out of async for, no async with) cancels its workers.

    Nothing keeps sending (and billing) prompts nobody will read, and no task is left
    pending for the loop to destroy.
    """
    async with Emulator(latency=0.01) as emu, FluxClient(base_url=emu.base_url) as client:
        before = asyncio.all_tasks()
        async for result in client.iter_generate([f"p{i}" for i in range(2000)], concurrency=16):
            assert result.ok
            break
        workers = _flux_tasks_since(before)
        assert all(task.cancelling() for task in workers)
        await asyncio.gather(*workers, return_exceptions=True)
        # At most the first wave and the attempts the queue had room for were sent.
        assert emu.stats.requests <= 16 * 5
        connector = client.transport.session.connector if client.transport.session else None
        assert connector is not None
        assert not connector._acquired


async def test_gather_results_go_when_the_caller_drops_them(client: FluxClient) -> None:
    """Once gather_generate has returned, nothing of the fan-out holds its results: the
    caller dropping the list frees them at once, not at the collector's next full pass
    (10,000 results with their b64 payloads are hundreds of MB)."""
    gc.disable()  # reference counting alone must free them
    try:
        results = await client.gather_generate([f"p{i}" for i in range(20)], concurrency=4)
        assert all(r.ok for r in results)
        freed = [weakref.ref(r) for r in results]
        del results
        assert [ref() for ref in freed] == [None] * 20
    finally:
        gc.enable()


@contextlib.contextmanager
def _counting_workers(at_most: int) -> Iterator[list[int]]:
    """Count the fan-out worker tasks started in the running loop (``counted[0]``); the
    one past ``at_most`` fails the test at once, instead of letting a million start."""
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    counted = [0]

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Future[Any]:
        if getattr(coro, "__qualname__", "") == "_Engine._worker":
            counted[0] += 1
            if counted[0] > at_most:
                coro.close()
                raise AssertionError(f"more than {at_most} fan-out workers were started")
        if previous is not None:
            return previous(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    try:
        yield counted
    finally:
        loop.set_task_factory(previous)


class _Held:
    """A MockTransport handler that holds every request until ``wanted`` are in at once
    (so a fan-out that never has that many on the wire fails on its timeout), and counts
    the most in at once."""

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.inside = 0
        self.most = 0
        self.all_in = asyncio.Event()

    async def __call__(self, request: TransportRequest) -> TransportResponse:
        self.inside += 1
        self.most = max(self.most, self.inside)
        if self.inside >= self.wanted:
            self.all_in.set()
        await self.all_in.wait()
        self.inside -= 1
        return TransportResponse(200, json={"created": 1, "data": [{"url": "https://x/1.png"}]})


@pytest.mark.parametrize("mode", ["gather", "iter", "async input"])
async def test_a_huge_concurrency_costs_only_the_prompts_given(mode: str) -> None:
    """concurrency=1_000_000 over 5 prompts (a typo's extra zeros) starts a worker per
    prompt taken (plus one that finds the input ended), not one per slot: a million
    workers, each to find the input empty, took 20 s and 1.4 GB. The concurrency is
    not capped either: all 5 prompts are on the wire at once."""
    prompts = [f"p{i}" for i in range(5)]
    held = _Held(wanted=len(prompts))

    async def async_prompts() -> AsyncIterator[str]:
        for prompt in prompts:
            yield prompt

    async with FluxClient(api_key="sk-test", transport=MockTransport(held)) as client:
        with _counting_workers(at_most=50) as started:
            async with asyncio.timeout(30):  # a guard against a hang, not a measurement
                if mode == "gather":
                    results = await client.gather_generate(prompts, concurrency=1_000_000)
                else:
                    source = prompts if mode == "iter" else async_prompts()
                    fanout = client.iter_generate(source, concurrency=1_000_000)
                    async with fanout:
                        results = [result async for result in fanout]
    assert sorted(r.index for r in results) == [0, 1, 2, 3, 4]
    assert all(r.ok for r in results)
    assert held.most == len(prompts)
    assert len(prompts) <= started[0] <= len(prompts) + 1


async def test_workers_fill_the_concurrency_as_prompts_come() -> None:
    """Started as prompts come, the workers still put ``concurrency`` prompts on the wire
    at once, and no more workers than that run without a backoff."""
    held = _Held(wanted=8)
    async with FluxClient(api_key="sk-test", transport=MockTransport(held)) as client:
        with _counting_workers(at_most=50) as started:
            async with asyncio.timeout(30):  # a guard against a hang, not a measurement
                results = await client.gather_generate([f"p{i}" for i in range(40)], concurrency=8)
    assert all(r.ok for r in results)
    assert held.most == 8
    assert started[0] == 8


async def test_stand_ins_finishing_in_the_same_turn_retire_only_the_surplus() -> None:
    """Six workers for two slots wake together (an outage guard letting its wave go, a
    batch that stopped) and ask `surplus` in one turn of the loop: four retire, two stay.
    A worker's task leaves the pool only once it has ended, and counted until then all
    six retired, leaving the rest of the input with no worker."""
    go = asyncio.Event()
    answers: list[bool] = []

    async def work() -> None:
        await go.wait()
        answers.append(workers.surplus())

    workers = Workers(work, concurrency=2, limit=8, on_start=lambda: None)
    workers.start(asyncio.get_running_loop())
    workers.sleeping = 4  # as if four were in backoff: room for four stand-ins
    for _ in range(5):
        workers.add()
    assert len(workers.tasks) == 6
    workers.sleeping = 0  # they all woke up
    go.set()
    await workers.wait()
    assert sorted(answers) == [False, False, True, True, True, True]

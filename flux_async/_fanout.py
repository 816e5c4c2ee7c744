"""The fan-out engine behind `FluxClient.iter_generate` and `FluxClient.gather_generate`.

Shape: a pool of worker tasks pulls prompts one at a time from the caller's iterable
(sync or async), so memory is O(concurrency) however many prompts there are: no task or
coroutine exists for a prompt before a worker takes it. The pool grows with the prompts
taken (`Workers`), so a ``concurrency`` far beyond the input costs nothing. Every HTTP
attempt takes a concurrency slot only while it is on the wire; a prompt sleeping in
backoff holds no slot, and the pool has more workers than slots so that sleepers do not
starve the wire. Results go to a bounded queue, which is the back-pressure on a slow
consumer.

Nothing is dropped: every prompt taken from the input yields exactly one
`GenerationResult`, a response or the error that ended it. Nothing outlives the
fan-out either: the public `Fanout` is a thin handle on a private engine whose workers
do not refer back to the handle, so a handle that is dropped (a ``break`` out of
``async for`` without ``async with``) is collected and its workers cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterable, Callable, Iterable
from pathlib import Path
from types import TracebackType

from ._attempt import CallContext, run_request
from ._counters import Counters
from ._exceptions import DeadlineExceededError, FluxError
from ._fanout_results import END, Delivery, FanoutStatistics, GenerationResult
from ._fanout_save import Saver
from ._fanout_settings import DEFAULT_CONCURRENCY, DEFAULT_STOP_ON, FanoutSettings
from ._fanout_stop import DOWNLOAD_FAILURES_TO_STOP, Stop, fail_fast_error
from ._limits import ConcurrencyLimit
from ._models import ImageRequest, ImagesResponse, without_b64
from ._prompts import BuildRequest, Feed, PromptInput, prompt_text, request_maker, to_request
from ._workers import Workers

# The fan-out's names other modules use are re-exported here, the fan-out's front door.
__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_STOP_ON",
    "DOWNLOAD_FAILURES_TO_STOP",
    "BuildRequest",
    "Fanout",
    "FanoutSettings",
    "FanoutStatistics",
    "GenerationResult",
    "PromptInput",
    "gather_results",
    "to_request",
]

logger = logging.getLogger("flux_async")


class Fanout:
    """An async iterator of `GenerationResult` s, in completion order.

    Made by `FluxClient.iter_generate`. Use it with ``async with`` when you may stop
    early: leaving the block cancels whatever is still running and returns every
    connection. Running to the end, being cancelled, or being dropped (a ``break`` out of
    ``async for``, after which nothing refers to it) cleans up too.

    Example::

        async with client.iter_generate(prompts, concurrency=64) as results:
            async for result in results:
                print(result.index, result.ok)
                print(results.statistics())
    """

    __slots__ = ("__weakref__", "_engine")

    def __init__(
        self,
        ctx: CallContext,
        build: BuildRequest,
        items: Iterable[PromptInput] | AsyncIterable[PromptInput],
        settings: FanoutSettings,
    ) -> None:
        engine = _Engine(ctx, build, items, settings)
        self._engine = engine
        # The workers refer to the engine, never to this handle: once the caller drops
        # the handle it is collected, and the workers stop instead of billing prompts
        # nobody will read.
        weakref.finalize(self, engine.abandon)

    def statistics(self) -> FanoutStatistics:
        """A frozen snapshot of the counts so far.

        Example::

            stats = results.statistics()
            print(stats.done, stats.failed, stats.rate)
        """
        return self._engine.statistics()

    @property
    def stopped_by(self) -> FluxError | None:
        """The error that stopped this fan-out early, or None: a ``stop_on`` answer, a
        connection error from a server that has never answered (a wrong host or port),
        or an `ImageSaveError` every prompt would get too (a full or read-only disk, an
        image host that failed `DOWNLOAD_FAILURES_TO_STOP` prompts in a row).

        Example::

            async with client.iter_generate(prompts) as results:
                async for result in results:
                    ...
                if results.stopped_by is not None:
                    sys.exit(f"stopped: {results.stopped_by}")
        """
        return self._engine.stopped_by

    def report_save(self, index: int, error: FluxError | None) -> None:
        """Tell the fan-out how saving prompt ``index``'s images went, for a caller that
        saves them itself rather than with ``save_to=``: an error every prompt would get
        too stops the fan-out as it would with ``save_to=`` (``stopped_by``; not with
        ``stop_on=()``), and None (saved) ends a row of failed downloads. Results already
        generated ahead of the caller's loop (a queue of up to 4 x ``concurrency``) still
        come; the prompts after them end unsent.

        Example::

            try:
                await result.response.save("out", client=client)
            except flux_async.ImageSaveError as exc:
                results.report_save(result.index, exc)
            else:
                results.report_save(result.index, None)
        """
        self._engine.report_save(index, error)

    def __aiter__(self) -> Fanout:
        return self

    async def __aenter__(self) -> Fanout:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def __anext__(self) -> GenerationResult:
        return await self._engine.next_result()

    async def aclose(self) -> None:
        """Cancel what is still running and wait until every task has ended.

        Example::

            results = client.iter_generate(prompts)
            try:
                first = await anext(results)
            finally:
                await results.aclose()
        """
        await self._engine.aclose()

    async def drain(self, sink: Callable[[GenerationResult], None]) -> None:
        """Run to the end handing each result to ``sink``: no queue, no iterator.

        What `FluxClient.gather_generate` uses: with nobody consuming in between, results
        skip the queue and the hand-over to the consumer task. Raises what iterating would
        (the caller's input error, or the first failure with ``fail_fast``); cancelling
        it cancels everything still running.

        Example::

            await client.iter_generate(prompts).drain(lambda r: print(r.index, r.ok))
        """
        await self._engine.drain(sink)


class _Engine:
    """The workers and the state they share; see the module docstring for the shape.

    Each part has one job: the `Feed` hands out the input, `Workers` sizes the pool of
    worker tasks, `Delivery` passes results on, `Stop` knows whether the fan-out stopped
    and why, and the `Saver` (with ``save_to=``) saves each prompt's images.
    """

    def __init__(
        self,
        ctx: CallContext,
        build: BuildRequest,
        items: Iterable[PromptInput] | AsyncIterable[PromptInput],
        settings: FanoutSettings,
    ) -> None:
        self._feed = Feed(items)
        self._ctx = ctx
        self._settings = settings
        # Carries the model: the caller fills it in from its client.
        self._make_request = request_maker(build, settings.fields)
        concurrency = settings.concurrency
        self._slot = ConcurrencyLimit(concurrency)
        self._counters = Counters(self._on_backoff)
        self._stop = Stop(
            settings.stop_on, self._counters, ctx.outage, settings.policy.retry_after_max
        )
        self.report_save = self._stop.report_save
        self._saver = None if settings.save is None else Saver(settings.save, self._stop.saved)
        self._delivery = Delivery()
        # Stand-ins keep the wire full while workers sleep in backoff. When saving, none:
        # a prompt is in progress from its first attempt until its images are on disk,
        # and at most `concurrency` of them may be (a crash then costs at most that many
        # generations paid twice); woken sleepers and stand-ins would briefly exceed it.
        self._workers = Workers(
            self._worker,
            concurrency=concurrency,
            limit=concurrency if settings.save is not None else 4 * concurrency,
            on_start=self._delivery.worker_started,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at = 0.0
        self._deadline_at: float | None = None
        self._expired = False
        self._closed = False

    @property
    def stopped_by(self) -> FluxError | None:
        return self._stop.stopped_by

    def statistics(self) -> FanoutStatistics:
        c = self._counters
        elapsed = 0.0 if self._loop is None else self._loop.time() - self._started_at
        return FanoutStatistics(
            submitted=self._feed.taken,
            in_flight=c.in_flight,
            done=c.done,
            succeeded=c.done - c.failed,
            failed=c.failed,
            retries=c.retries,
            rate_limited=c.rate_limited,
            rate=self._settings.limiter.statistics().rate,
            elapsed=elapsed,
        )

    async def next_result(self) -> GenerationResult:
        delivery = self._delivery
        if delivery.queue is None:
            if self._closed:
                raise StopAsyncIteration
            self._start()
        try:
            try:
                result = await delivery.next()
            except Exception:
                # The caller's own input failed: theirs to see, once the rest is stopped.
                await self.aclose()
                raise
            if result is None:
                await self.aclose()
                raise StopAsyncIteration
            if self._settings.fail_fast and result.error is not None:
                await self.aclose()
                raise fail_fast_error(result)
            return result
        except asyncio.CancelledError:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        self._closed = True
        try:
            await self._workers.stop()
        finally:
            if self._saver is not None:
                await self._saver.aclose()
        self._delivery.close()

    def abandon(self) -> None:
        """The handle was collected: cancel the workers (nobody can await them now)."""
        self._closed = True
        self._feed.exhausted = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self._workers.cancel()
        if self._saver is not None:
            self._saver.abandon()

    async def drain(self, sink: Callable[[GenerationResult], None]) -> None:
        delivery = self._delivery
        if delivery.queue is not None or self._closed:
            raise RuntimeError("this fan-out has already been started")
        delivery.sink = sink
        self._start()
        try:
            await self._workers.wait()
        finally:
            await self.aclose()
        if delivery.input_error is not None:
            raise delivery.input_error
        if self._stop.failure is not None:
            raise fail_fast_error(self._stop.failure)

    def _start(self) -> None:
        # A client busy in another event loop fails the batch here, not each prompt.
        self._ctx.check_loop()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._started_at = loop.time()
        if self._settings.batch_deadline is not None:
            self._deadline_at = self._started_at + self._settings.batch_deadline
        # The queue bound makes a slow consumer pause the workers.
        self._delivery.open(maxsize=self._workers.limit)
        self._feed.start()
        if self._saver is not None:
            self._saver.start()
        self._workers.start(loop)

    def _on_backoff(self, delta: int) -> None:
        """A worker goes to sleep in backoff (+1) or wakes up (-1): see `Workers`."""
        self._workers.sleeping += delta
        if delta > 0:
            self._add_worker()

    def _add_worker(self) -> None:
        """One more worker, if the pool is short of ``concurrency`` awake (`Workers.add`)
        and more prompts may come."""
        if not self._closed and not self._feed.exhausted and not self._expired:
            self._workers.add()

    async def _worker(self) -> None:
        feed = self._feed
        workers = self._workers
        delivery = self._delivery
        queue = delivery.queue
        sink = delivery.sink
        fail_fast = self._settings.fail_fast
        try:
            # The first prompt is taken outside the loop: with it, this worker starts the
            # next, so the pool grows with the prompts taken, never ahead, at no cost.
            taken = None if feed.exhausted or self._expired else await feed.take()
            if taken is not None:
                self._add_worker()
            while taken is not None:
                result = await self._process(*taken)
                if sink is None:
                    assert queue is not None
                    await queue.put(result)
                else:
                    sink(result)
                    if fail_fast and result.error is not None:
                        self._fail(result)
                        break
                if workers.surplus():
                    break  # a sleeper woke up: this worker was its stand-in
                if feed.exhausted or self._expired:
                    break
                taken = await feed.take()
        except Exception as exc:
            # Only the caller's own iterable can get here (_process captures the rest):
            # its error is the caller's to see, raised from the iteration.
            if delivery.input_error is None:
                delivery.input_error = exc
            feed.exhausted = True
        if queue is not None:
            await queue.put(END)

    def _fail(self, result: GenerationResult) -> None:
        """fail_fast in drain mode: remember the first failure and stop everyone else."""
        if self._stop.failure is None:
            self._stop.failure = result
        self._feed.exhausted = True
        self._workers.cancel(spare=asyncio.current_task())

    async def _process(self, index: int, item: object) -> GenerationResult:
        loop = self._loop
        assert loop is not None
        started = loop.time()
        settings = self._settings
        request: ImageRequest | None = None
        response: ImagesResponse | None = None
        attempts = 0
        try:
            request = self._make_request(item)
            if self._counters.halted is not None:
                error = await self._stop.skip()
                return self._finish(index, item, request, None, error, 0, started)
            call = run_request(
                self._ctx,
                request,
                settings.policy,
                settings.timeout,
                None,
                self._slot,
                settings.limiter,
                self._counters,
            )
            files: tuple[Path, ...] = ()
            saver = self._saver
            if self._deadline_at is None:
                response, attempts = await call
                if saver is not None:
                    files = await saver.store(index, request, response, attempts)
            else:
                async with asyncio.timeout_at(self._deadline_at):
                    response, attempts = await call
                    if saver is not None:
                        files = await saver.store(index, request, response, attempts)
        except TimeoutError:
            self._expired = True
            expired = DeadlineExceededError(
                f"the batch deadline of {settings.batch_deadline or 0:g} s passed before "
                "this prompt finished"
            )
            return self._finish(index, item, request, response, expired, attempts, started)
        except FluxError as exc:
            self._stop.observe(exc, index)
            attempts = getattr(exc, "attempts", 0)
            return self._finish(index, item, request, response, exc, attempts, started)
        except Exception as exc:
            # A bug must not sink a million-prompt batch; it is reported on its prompt.
            logger.exception("prompt #%d failed unexpectedly", index)
            return self._finish(index, item, request, response, exc, attempts, started)
        return self._finish(index, item, request, response, None, attempts, started, files)

    def _finish(
        self,
        index: int,
        item: object,
        request: ImageRequest | None,
        response: ImagesResponse | None,
        error: BaseException | None,
        attempts: int,
        started: float,
        files: tuple[Path, ...] = (),
    ) -> GenerationResult:
        counters = self._counters
        counters.done += 1
        if error is not None:
            counters.failed += 1
        elif files and response is not None:
            response = without_b64(response)  # the bytes are in the files
        if request is not None and attempts > 1:
            # n > 10 images are several calls: attempts beyond one a call are retries.
            counters.retries += max(0, attempts - len(request.chunks()))
        loop = self._loop
        assert loop is not None
        result = GenerationResult(
            index=index,
            prompt=request.prompt if request is not None else prompt_text(item),
            request=request,
            response=response,
            error=error,
            attempts=attempts,
            elapsed=loop.time() - started,
            files=files,
        )
        on_progress = self._settings.on_progress
        if on_progress is not None:
            on_progress(self.statistics())
        return result


async def gather_results(
    fanout: Fanout, requests: list[ImageRequest], batch_deadline: float | None
) -> list[GenerationResult]:
    """Run ``fanout``, made over ``requests``, to the end: one result per request, in
    input order; a request the batch deadline kept from starting gets a result too, with
    a `DeadlineExceededError`. What `FluxClient.gather_generate` returns.

    Example::

        results = await gather_results(client.iter_generate(requests), requests, None)
    """
    results: list[GenerationResult | None] = [None] * len(requests)

    def collect(result: GenerationResult) -> None:
        results[result.index] = result

    await fanout.drain(collect)
    missing = DeadlineExceededError(
        f"the batch deadline of {batch_deadline or 0:g} s passed before this prompt started",
        attempts=0,
    )
    return [
        r
        if r is not None
        else GenerationResult(
            index=i, prompt=requests[i].prompt, request=requests[i], error=missing
        )
        for i, r in enumerate(results)
    ]

"""The fan-out engine behind `FluxClient.iter_generate` and `FluxClient.gather_generate`.

Shape: a fixed pool of worker tasks pulls prompts one at a time from the caller's
iterable (sync or async), so memory is O(concurrency) however many prompts there are:
no task or coroutine exists for a prompt before a worker takes it. Every HTTP attempt
takes a concurrency slot only while it is on the wire; a prompt sleeping in backoff
holds no slot, and the pool has more workers than slots so that sleepers do not starve
the wire. Results go to a bounded queue, which is the back-pressure on a slow consumer.

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
from collections.abc import AsyncIterable, Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

import attrs

from ._attempt import Call, CallContext, run_request
from ._config import check_seconds, check_timeout, is_finite_positive
from ._counters import Counters
from ._exceptions import (
    APIStatusError,
    BatchStoppedError,
    DeadlineExceededError,
    FluxError,
    ImageSaveError,
    ValidationError,
)
from ._limits import ConcurrencyLimit, Limiter, RateLimiter
from ._models import MAX_N_PER_REQUEST, ImageRequest, ImagesResponse
from ._save import Downloader, check_directory

if TYPE_CHECKING:
    from ._config import Timeout
    from ._retry import RetryPolicy

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_STOP_ON",
    "Fanout",
    "FanoutSettings",
    "FanoutStatistics",
    "GenerationResult",
    "PromptInput",
    "SaveTo",
    "check_stop_on",
    "default_stem",
    "fanout_limiter",
    "save_settings",
    "to_request",
]

logger = logging.getLogger("flux_async")

#: Attempts on the wire at once when the caller does not say.
DEFAULT_CONCURRENCY = 16

#: The answers that stop a fan-out: every other prompt would get them too (a wrong or
#: missing key, a key without access, a wrong base_url or model).
DEFAULT_STOP_ON: frozenset[int] = frozenset({401, 403, 404})

#: Builds a request from a prompt (or request) and fields: `FluxClient.build_request`.
BuildRequest: TypeAlias = Callable[[Any, Mapping[str, Any] | None], ImageRequest]

#: One item of a fan-out's input: a prompt, a full request, or a mapping of request
#: fields (``{"prompt": ..., "n": 2}``) applied over the call's fields.
PromptInput: TypeAlias = str | ImageRequest | Mapping[str, Any]


@attrs.frozen(kw_only=True)
class GenerationResult:
    """The outcome of one prompt of a fan-out: a ``response`` or the ``error`` that ended it.

    ``index`` is the prompt's position in the input, ``attempts`` the HTTP attempts it
    took (all chunks together for ``n`` > 10), ``elapsed`` seconds from start to finish.
    ``files`` are the paths its images were saved to, in the order of
    ``response.data``, when the fan-out had ``save_to=`` (else empty). A generation that
    succeeded but whose images could not be saved has both: its ``response`` (nothing
    the server returned is lost) and an `ImageSaveError` as its ``error``.

    Example::

        for result in await client.gather_generate(prompts, save_to="out"):
            if result.ok:
                print(result.index, result.files)
            else:
                print(result.index, "failed:", result.error)
    """

    index: int
    prompt: str | None
    request: ImageRequest | None
    response: ImagesResponse | None = None
    error: BaseException | None = None
    attempts: int = 0
    elapsed: float = 0.0
    files: tuple[Path, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the prompt produced images.

        Example::

            failed = [r for r in results if not r.ok]
        """
        return self.error is None

    def unwrap(self) -> ImagesResponse:
        """The response, or raise the error that ended this prompt.

        Example::

            urls = results[0].unwrap().urls
        """
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


@attrs.frozen(kw_only=True)
class FanoutStatistics:
    """A snapshot of a running fan-out, for progress bars and logs.

    ``submitted`` prompts taken from the input, ``in_flight`` HTTP attempts on the wire,
    ``done`` prompts finished (``succeeded`` + ``failed``), ``retries`` extra attempts,
    ``rate_limited`` 429 answers seen, ``rate`` the limiter's current pacing rate
    (requests/s, ``None`` when unpaced), ``elapsed`` seconds since the fan-out started.

    Example::

        def show(stats: FanoutStatistics) -> None:
            print(f"{stats.done}/{stats.submitted} done, {stats.rate_limited} x 429")

        await client.gather_generate(prompts, on_progress=show)
    """

    submitted: int
    in_flight: int
    done: int
    succeeded: int
    failed: int
    retries: int
    rate_limited: int
    rate: float | None
    elapsed: float


_END = object()


def default_stem(index: int, prompt: str) -> str:
    """The file name (without suffix) of prompt ``index``'s images under ``save_to``: the
    index, zero-padded to six digits, so a directory listing sorts in input order.

    Example::

        default_stem(42, "a red fox")  # '000042' -> 000042.png (000042-0.png ... for n > 1)
    """
    return f"{index:06d}"


@attrs.frozen(kw_only=True)
class SaveTo:
    """Where and how a fan-out saves each prompt's images (made by `save_settings`).

    ``stem(index, prompt)`` names a prompt's files inside ``directory``; ``downloads``
    bounds the URL downloads in progress at once (they use the pool's connections beyond
    the fan-out's ``concurrency``).

    Example::

        SaveTo(downloader=client.downloader, directory=Path("out"), stem=default_stem,
               downloads=32)
    """

    downloader: Downloader
    directory: Path
    stem: Callable[[int, str], str]
    downloads: int


def save_settings(
    save_to: object,
    save_stem: object,
    downloader: Downloader,
    *,
    concurrency: int,
    pool: int | None,
) -> SaveTo | None:
    """Check ``save_to`` and ``save_stem``; the `SaveTo` they ask for (None: no saving).

    Downloads get the pool's connections beyond ``concurrency`` (at least one, at most
    2 x ``concurrency``), so they never hold a connection a generation is waiting for.

    Example::

        save_settings("out", None, client.downloader, concurrency=16, pool=100)
    """
    if save_stem is not None and not callable(save_stem):
        raise ValidationError(
            "save_stem", save_stem, "a function (index, prompt) -> file name, or None"
        )
    if save_to is None:
        if save_stem is not None:
            raise ValidationError("save_stem", save_stem, "None unless save_to is given")
        return None
    directory = check_directory("save_to", save_to)
    downloads = max(1, min(2 * concurrency, pool - concurrency)) if pool else 2 * concurrency
    return SaveTo(
        downloader=downloader,
        directory=directory,
        stem=default_stem if save_stem is None else save_stem,
        downloads=downloads,
    )


def check_stop_on(stop_on: object) -> frozenset[int]:
    """``stop_on`` as a set of statuses; `ValidationError` unless it is a collection of
    HTTP error statuses (400-599).

    Example::

        check_stop_on({401, 403})  # frozenset({401, 403})
        check_stop_on(())          # never stop
    """
    allowed = (
        "a collection of HTTP error statuses (400-599) that stop the batch, such as "
        "{401, 403, 404} (the default); () never stops"
    )
    if isinstance(stop_on, str | bytes) or not isinstance(stop_on, Collection):
        raise ValidationError("stop_on", stop_on, allowed)
    statuses = frozenset(stop_on)
    for status in statuses:
        if type(status) is not int or not 400 <= status <= 599:
            raise ValidationError("stop_on", stop_on, allowed)
    return statuses


def _prompt_text(item: object) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, ImageRequest):
        return item.prompt
    if isinstance(item, Mapping):
        value = item.get("prompt")
        return value if isinstance(value, str) else None
    return None


def to_request(build: BuildRequest, item: object, fields: Mapping[str, Any]) -> ImageRequest:
    """One input item as a validated request; ``fields`` are the batch's own fields.

    Example::

        to_request(client.build_request, {"prompt": "a fox", "n": 2}, {})
    """
    if isinstance(item, ImageRequest):
        return item
    if isinstance(item, str):
        return build(item, fields)
    if isinstance(item, Mapping):
        own = {k: v for k, v in item.items() if k != "prompt"}
        return build(item.get("prompt"), {**fields, **own})
    raise ValidationError(
        "prompt", item, "a string, an ImageRequest, or a mapping with a 'prompt' key"
    )


def fanout_limiter(
    *,
    concurrency: int,
    rate_limit: float | None,
    per: float,
    burst: int,
    limiter: Limiter | None,
    deadline: float | None,
    batch_deadline: float | None,
    timeout: object,
    fail_fast: bool,
    on_progress: object,
    pool: int | None,
) -> Limiter | None:
    """Check a fan-out's settings before anything is sent; return the limiter they ask
    for: a new `RateLimiter` for ``rate_limit``, the caller's ``limiter``, or None (the
    client's own). ``pool`` is the client's connection pool size, when it has one.

    Example::

        fanout_limiter(concurrency=16, rate_limit=50, per=1.0, burst=1, limiter=None,
                       deadline=None, batch_deadline=None, timeout=None, fail_fast=False,
                       on_progress=None, pool=100)   # RateLimiter(50)
    """
    if type(concurrency) is not int or concurrency < 1:
        raise ValidationError("concurrency", concurrency, "an integer >= 1")
    check_seconds("deadline", deadline)
    check_seconds("batch_deadline", batch_deadline)
    check_timeout(timeout)
    if type(fail_fast) is not bool:
        raise ValidationError("fail_fast", fail_fast, "True or False")
    if on_progress is not None and not callable(on_progress):
        raise ValidationError(
            "on_progress", on_progress, "a function taking a FanoutStatistics, or None"
        )
    if limiter is not None and not isinstance(limiter, Limiter):
        raise ValidationError("limiter", limiter, "a flux_async.Limiter, or None")
    if rate_limit is None:
        # Without a rate they would silently do nothing.
        for name, value, default in (("per", per, 1.0), ("burst", burst, 1)):
            if value != default:
                raise ValidationError(
                    name,
                    value,
                    f"the default ({default}) unless rate_limit is given: per and burst "
                    "need rate_limit (a limiter of your own sets its own)",
                )
    if pool and pool < concurrency:
        # Attempts beyond the pool would queue for a connection inside aiohttp, where
        # the wait counts against Timeout.connect and fails as a timeout.
        raise ValidationError(
            "concurrency",
            concurrency,
            f"at most the client's max_connections ({pool}); "
            f"create the client with FluxClient(max_connections={concurrency}) or more",
        )
    if limiter is not None and rate_limit is not None:
        raise ValidationError(
            "rate_limit", rate_limit, "None when a limiter is given (set its rate instead)"
        )
    if rate_limit is not None:
        if not is_finite_positive(rate_limit):
            raise ValidationError(
                "rate_limit", rate_limit, "a finite number of requests per `per` seconds, > 0"
            )
        limiter = RateLimiter(rate_limit, per=per, burst=burst)
    return limiter


def _fail_fast_error(result: GenerationResult) -> BaseException:
    """The error that ends a fail_fast fan-out, noting what happened to the rest."""
    error = result.error
    assert error is not None
    error.add_note(
        f"fail_fast: prompt #{result.index} failed; the prompts still running were cancelled"
    )
    return error


@attrs.frozen(kw_only=True)
class FanoutSettings:
    """How one fan-out runs: the arguments of `FluxClient.iter_generate`, checked and
    resolved (the limiter and policy to use, the batch's fields with the model filled in).

    Example::

        FanoutSettings(concurrency=16, limiter=client.limiter, policy=RetryPolicy(),
                       timeout=DEFAULT_TIMEOUT, fields={"model": "flux-kontext-pro"},
                       fail_fast=False, batch_deadline=None, on_progress=None)
    """

    concurrency: int
    limiter: Limiter
    policy: RetryPolicy
    timeout: Timeout
    fields: Mapping[str, Any]
    fail_fast: bool
    batch_deadline: float | None
    on_progress: Callable[[FanoutStatistics], None] | None
    save: SaveTo | None = None
    stop_on: frozenset[int] = DEFAULT_STOP_ON


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
    def stopped_by(self) -> APIStatusError | None:
        """The answer that stopped this fan-out early (``stop_on``), or None.

        Example::

            async with client.iter_generate(prompts) as results:
                async for result in results:
                    ...
                if results.stopped_by is not None:
                    sys.exit(f"stopped: {results.stopped_by}")
        """
        return self._engine.stopped_by

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
    """The workers and the state they share; see the module docstring for the shape."""

    def __init__(
        self,
        ctx: CallContext,
        build: BuildRequest,
        items: Iterable[PromptInput] | AsyncIterable[PromptInput],
        settings: FanoutSettings,
    ) -> None:
        self._ctx = ctx
        self._build = build
        self._sync_items: Iterator[PromptInput] | None = None
        self._async_items: Any = None
        if isinstance(items, AsyncIterable):
            self._async_items = aiter(items)
        elif isinstance(items, Iterable) and not isinstance(items, str | bytes | Mapping):
            self._sync_items = iter(items)
        else:
            raise ValidationError(
                "prompts",
                items,
                "an iterable or async iterable of prompts (a lone string "
                "is one prompt: wrap it in a list)",
            )
        concurrency = settings.concurrency
        self._concurrency = concurrency
        self._slot = ConcurrencyLimit(concurrency)
        self._limiter = settings.limiter
        self._policy = settings.policy
        self._client_timeout = settings.timeout
        # Carries the model: the caller fills it in from its client.
        self._fields = dict(settings.fields)
        # String prompts are this template with their own prompt (see `_to_request`).
        self._template = ImageRequest(prompt="x", **self._fields)
        self._fail_fast = settings.fail_fast
        self._batch_deadline = settings.batch_deadline
        self._on_progress = settings.on_progress
        self._counters = Counters(self._on_backoff)
        self._queue: asyncio.Queue[GenerationResult | object] | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._sleeping = 0  # workers in a backoff sleep
        # Stand-ins keep the wire full while workers sleep in backoff. When saving, none:
        # a prompt is in progress from its first attempt until its images are on disk,
        # and at most `concurrency` of them may be (a crash then costs at most that many
        # generations paid twice); woken sleepers and stand-ins would briefly exceed it.
        self._max_workers = concurrency if settings.save is not None else 4 * concurrency
        self._input_lock: asyncio.Lock | None = None
        self._deadline_at: float | None = None
        self._started_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_index = 0
        self._running_workers = 0
        self._exhausted = False
        self._expired = False
        self._input_error: Exception | None = None
        self._sink: Callable[[GenerationResult], None] | None = None
        self._failure: GenerationResult | None = None
        self._closed = False
        self._save = settings.save
        self._downloads = (
            None if settings.save is None else asyncio.Semaphore(settings.save.downloads)
        )
        self._stop_on = settings.stop_on
        self.stopped_by: APIStatusError | None = None
        self._stopped_index = -1
        self._not_sent = 0

    def statistics(self) -> FanoutStatistics:
        c = self._counters
        elapsed = 0.0 if self._loop is None else self._loop.time() - self._started_at
        return FanoutStatistics(
            submitted=c.submitted,
            in_flight=c.in_flight,
            done=c.done,
            succeeded=c.done - c.failed,
            failed=c.failed,
            retries=c.retries,
            rate_limited=c.rate_limited,
            rate=self._limiter.statistics().rate,
            elapsed=elapsed,
        )

    async def next_result(self) -> GenerationResult:
        if self._queue is None:
            if self._closed:
                raise StopAsyncIteration
            self._start()
        queue = self._queue
        assert queue is not None
        try:
            while True:
                if self._running_workers == 0 and queue.empty():
                    await self.aclose()
                    raise StopAsyncIteration
                item = await queue.get()
                if item is _END:
                    self._running_workers -= 1
                    if self._input_error is not None:
                        error = self._input_error
                        self._input_error = None
                        await self.aclose()
                        raise error
                    continue
                assert isinstance(item, GenerationResult)
                if self._fail_fast and item.error is not None:
                    await self.aclose()
                    raise _fail_fast_error(item)
                return item
        except asyncio.CancelledError:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        self._closed = True
        workers, self._workers = self._workers, set()
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        self._running_workers = 0
        self._queue = None

    def abandon(self) -> None:
        """The handle was collected: cancel the workers (nobody can await them now)."""
        self._closed = True
        self._exhausted = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for task in self._workers:
            task.cancel()

    async def drain(self, sink: Callable[[GenerationResult], None]) -> None:
        if self._queue is not None or self._closed:
            raise RuntimeError("this fan-out has already been started")
        self._sink = sink
        self._start()
        try:
            while self._workers:
                await asyncio.wait(set(self._workers))
        finally:
            await self.aclose()
        if self._input_error is not None:
            raise self._input_error
        if self._failure is not None:
            raise _fail_fast_error(self._failure)

    def _start(self) -> None:
        # A client busy in another event loop fails the batch here, not each prompt.
        self._ctx.check_loop()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._started_at = loop.time()
        if self._batch_deadline is not None:
            self._deadline_at = self._started_at + self._batch_deadline
        # One worker per slot: in the common case no worker ever waits for a slot, so a
        # request costs no hand-over between tasks. A worker going to sleep in backoff
        # calls _on_backoff, which adds a worker so the wire stays full; the queue bound
        # makes a slow consumer pause the workers.
        if self._sink is None:
            self._queue = asyncio.Queue(maxsize=self._max_workers)
        if self._async_items is not None:
            self._input_lock = asyncio.Lock()
        for _ in range(self._concurrency):
            self._spawn()

    def _spawn(self) -> None:
        assert self._loop is not None
        self._running_workers += 1
        task = self._loop.create_task(self._worker())
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    def _on_backoff(self, delta: int) -> None:
        self._sleeping += delta
        if (
            delta > 0
            and not self._closed
            and not self._exhausted
            and not self._expired
            and len(self._workers) - self._sleeping < self._concurrency
            and len(self._workers) < self._max_workers
        ):
            self._spawn()

    async def _next_item(self) -> tuple[int, object] | None:
        if self._exhausted or self._expired:
            return None
        if self._sync_items is not None:
            item: object = next(self._sync_items, _END)
        else:
            assert self._input_lock is not None
            async with self._input_lock:
                if self._exhausted:
                    return None
                item = await anext(self._async_items, _END)
        if item is _END:
            self._exhausted = True
            return None
        index = self._next_index
        self._next_index += 1
        self._counters.submitted += 1
        return index, item

    async def _worker(self) -> None:
        queue = self._queue
        sink = self._sink
        try:
            while True:
                taken = await self._next_item()
                if taken is None:
                    break
                result = await self._process(*taken)
                if sink is None:
                    assert queue is not None
                    await queue.put(result)
                else:
                    sink(result)
                    if self._fail_fast and result.error is not None:
                        self._fail(result)
                        break
                if len(self._workers) - self._sleeping > self._concurrency:
                    break  # a sleeper woke up: this worker was its stand-in
        except Exception as exc:
            # Only the caller's own iterable can get here (_process captures the rest):
            # its error is the caller's to see, raised from the iteration.
            if self._input_error is None:
                self._input_error = exc
            self._exhausted = True
        if queue is not None:
            await queue.put(_END)

    def _fail(self, result: GenerationResult) -> None:
        """fail_fast in drain mode: remember the first failure and stop everyone else."""
        if self._failure is None:
            self._failure = result
        self._exhausted = True
        current = asyncio.current_task()
        for task in self._workers:
            if task is not current:
                task.cancel()

    def _to_request(self, item: object) -> ImageRequest:
        if isinstance(item, str):
            # The hot path of a big batch: the batch's fields were checked once, in the
            # template; only the prompt is new.
            return self._template.with_prompt(item)
        return to_request(self._build, item, self._fields)

    async def _process(self, index: int, item: object) -> GenerationResult:
        loop = self._loop
        assert loop is not None
        started = loop.time()
        counters = self._counters
        request: ImageRequest | None = None
        response: ImagesResponse | None = None
        attempts = 0
        try:
            request = self._to_request(item)
            if counters.halted is not None:
                return await self._skip(index, item, request, started)
            if request.n > MAX_N_PER_REQUEST:
                call = run_request(
                    self._ctx,
                    request,
                    self._policy,
                    self._client_timeout,
                    None,
                    self._slot,
                    self._limiter,
                    counters,
                )
            else:
                call = Call(
                    self._ctx,
                    request,
                    None,
                    self._policy,
                    self._client_timeout,
                    None,
                    self._slot,
                    self._limiter,
                    counters,
                ).run()
            files: tuple[Path, ...] = ()
            if self._deadline_at is None:
                response, attempts = await call
                if self._save is not None:
                    files = await self._store(index, request, response, attempts)
            else:
                async with asyncio.timeout_at(self._deadline_at):
                    response, attempts = await call
                    if self._save is not None:
                        files = await self._store(index, request, response, attempts)
        except TimeoutError:
            self._expired = True
            error: BaseException = DeadlineExceededError(
                f"the batch deadline of {self._batch_deadline}s passed before this prompt finished"
            )
            return self._finish(index, item, request, response, error, attempts, started)
        except FluxError as exc:
            if (
                isinstance(exc, APIStatusError)
                and exc.status_code in self._stop_on
                and self.stopped_by is None
            ):
                self._halt(exc, index)
            return self._finish(
                index, item, request, response, exc, getattr(exc, "attempts", 0), started
            )
        except Exception as exc:
            # A bug must not sink a million-prompt batch; it is reported on its prompt.
            logger.exception("prompt #%d failed unexpectedly", index)
            return self._finish(index, item, request, response, exc, attempts, started)
        return self._finish(index, item, request, response, None, attempts, started, files)

    async def _store(
        self, index: int, request: ImageRequest, response: ImagesResponse, attempts: int
    ) -> tuple[Path, ...]:
        """Save a successful prompt's images; an `ImageSaveError` that says the generation
        succeeded (and carries its response) when they cannot be."""
        save = self._save
        downloads = self._downloads
        assert save is not None
        assert downloads is not None
        images = [(image.url, image.b64_json) for image in response.data]
        # The worker saves before it takes another prompt, and no stand-in replaces it
        # meanwhile: prompts generated but not yet saved never outnumber `concurrency`,
        # which bounds what a crash can make a rerun pay for twice. (A stand-in would
        # keep the wire full while it downloads; with generations taking seconds and
        # downloads a fraction of that, the wire stays nearly full anyway.)
        try:
            stem = save.stem(index, request.prompt)
            if any(b64 is None for _, b64 in images):
                async with downloads:
                    paths = await save.downloader.save_all(images, save.directory, stem)
            else:
                paths = await save.downloader.save_all(images, save.directory, stem)
        except (ImageSaveError, OSError) as exc:
            error = _not_saved(exc, response, attempts, len(images))
            if error is exc:
                raise
            raise error from exc
        return tuple(paths)

    def _halt(self, exc: APIStatusError, index: int) -> None:
        """Stop the fan-out: ``exc`` is an answer every other prompt would get too."""
        self.stopped_by = exc
        self._stopped_index = index
        self._counters.halted = self._stopped_error
        logger.info(
            "stopping the batch: prompt #%d got %s (%s); the prompts not sent yet will not be",
            index,
            exc.status_code,
            exc,
        )

    def _stopped_error(self, attempts: int) -> BatchStoppedError:
        reason = self.stopped_by
        assert reason is not None
        notes = " ".join(getattr(reason, "__notes__", ()))
        what = (
            "This prompt was not sent"
            if attempts == 0
            else f"This prompt was not retried after {attempts} attempt(s)"
        )
        return BatchStoppedError(
            f"{what}: the batch stopped when prompt #{self._stopped_index} got an answer "
            f"every prompt would get (stop_on={sorted(self._stop_on)}): "
            f"{type(reason).__name__}: {reason}{' ' + notes if notes else ''}",
            reason=reason,
            attempts=attempts,
        )

    async def _skip(
        self, index: int, item: object, request: ImageRequest | None, started: float
    ) -> GenerationResult:
        """A prompt taken after the fan-out stopped: it ends at once, unsent."""
        self._not_sent += 1
        if self._not_sent % 256 == 0:
            # Draining a long input ends no other way: let the loop breathe meanwhile.
            await asyncio.sleep(0)
        return self._finish(index, item, request, None, self._stopped_error(0), 0, started)

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
        if request is not None and attempts > 1:
            # A request for n > 10 images is several calls: only attempts beyond one per
            # call are retries.
            counters.retries += max(0, attempts - len(request.chunks()))
        loop = self._loop
        assert loop is not None
        result = GenerationResult(
            index=index,
            prompt=request.prompt if request is not None else _prompt_text(item),
            request=request,
            response=response,
            error=error,
            attempts=attempts,
            elapsed=loop.time() - started,
            files=files,
        )
        if self._on_progress is not None:
            self._on_progress(self.statistics())
        return result


def _not_saved(
    exc: BaseException, response: ImagesResponse, attempts: int, count: int
) -> ImageSaveError:
    """The error of a prompt whose generation succeeded but whose images were not saved:
    it says so, keeps the URL and carries the response."""
    images = "its image" if count == 1 else f"one of its {count} images"
    where = f" (request_id {response.request_id})" if response.request_id else ""
    if isinstance(exc, ImageSaveError):
        verb = "could not be fetched" if exc.url is not None else "could not be saved"
        message = f"The generation succeeded{where} but {images} {verb}: {exc.message}"
        exc.args = (message,)
        exc.message = message
        error = exc
    else:
        message = f"The generation succeeded{where} but writing {images} failed: {exc}"
        url = next((image.url for image in response.data if image.url), None)
        error = ImageSaveError(message, url=url, path=getattr(exc, "filename", None))
    # The message shows the URL without its query; the whole one stays in error.url.
    error.response = response
    error.request_id = response.request_id
    error.attempts = attempts
    return error

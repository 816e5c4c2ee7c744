"""`SyncFluxClient`: the async client, driven from plain (blocking) code.

Not a second implementation: one `FluxClient` runs on a private event loop in a daemon
thread, and each blocking call hands its coroutine to that loop and waits for the result.
So retries, rate limits, the pool and every error are exactly the async client's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, Unpack, overload

from ._client import FluxClient, RequestFields
from ._config import Timeout
from ._exceptions import ClientClosedError, EventLoopError
from ._fanout import (
    DEFAULT_CONCURRENCY,
    DEFAULT_STOP_ON,
    FanoutStatistics,
    GenerationResult,
    PromptInput,
)
from ._limits import Limiter
from ._models import Image, ImageRequest, ImagesResponse
from ._retry import RetryPolicy

__all__ = ["SyncFluxClient"]

_T = TypeVar("_T")
# How long Ctrl-C waits for the interrupted call to unwind before giving the caller back
# its KeyboardInterrupt: cancelling is quick, unless a transport of the user's is not.
_SETTLE_SECONDS = 10.0

_IN_LOOP = (
    "SyncFluxClient blocks until each call ends, and cannot be used inside a running event "
    "loop (async code, Jupyter): it would stall the loop. There, use the async client: "
    "`async with FluxClient(...) as client: await client.generate(...)`."
)


def _refuse_in_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise EventLoopError(_IN_LOOP)


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    """On the client's loop: cancel ``tasks`` (those begun) and wait until they end."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


class _LoopThread:
    """An event loop running forever in a daemon thread, until `stop`.

    A daemon thread, so a script that forgets to close its client can still exit (the
    client's finalizer closes it at exit anyway).
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="flux-async-sync", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # As asyncio.run ends: cancel what is left, finish async generators and the
            # default executor, then close, so nothing warns about an unclosed loop.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the loop and wait for its result (or its exception)."""
        tasks: list[asyncio.Task[Any]] = []
        interrupted = threading.Event()

        async def call() -> _T:
            tasks.append(asyncio.current_task())  # type: ignore[arg-type]
            if interrupted.is_set():  # Ctrl-C landed before the call began: it never does
                coro.close()
                raise asyncio.CancelledError
            return await coro

        try:
            # Inside the try: Ctrl-C is raised at any bytecode of this thread, the one
            # right after the call was handed over included.
            future = asyncio.run_coroutine_threadsafe(call(), self.loop)
            return future.result()
        except KeyboardInterrupt:
            # Cancel the call, and wait until it has unwound (its requests in flight
            # cancelled, a fan-out's workers stopped), so nothing keeps running behind
            # the caller's back. A call that has not begun yet sees `interrupted`.
            interrupted.set()
            settled = asyncio.run_coroutine_threadsafe(_cancel(tasks), self.loop)
            with contextlib.suppress(concurrent.futures.TimeoutError):
                settled.result(timeout=_SETTLE_SECONDS)
            raise

    def stop(self) -> None:
        """Stop the loop and wait for the thread to close it. Safe to call twice."""
        if self.loop.is_closed():
            return
        if threading.current_thread() is self.thread:
            # Collected inside the loop's own thread: it cannot wait for itself.
            self.loop.stop()
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # closed meanwhile
            return
        self.thread.join()


def _shutdown(runner: _LoopThread, client: FluxClient) -> None:
    """Close the client on its loop, then stop the loop (the finalizer of a sync client)."""
    if not runner.loop.is_closed() and threading.current_thread() is not runner.thread:
        runner.run(client.aclose())
    runner.stop()


class SyncFluxClient:
    """A blocking `FluxClient` for plain scripts: ``generate``, ``gather_generate`` and
    ``save`` return results instead of coroutines.

    It takes the same arguments as `FluxClient` and runs one on a private event loop in
    a background thread: the same retries, rate limits, pool and errors, with nothing to
    ``await``. Use it as a context manager, or call `close` (an unclosed client is closed
    when it is garbage-collected or at exit). Calls from several threads at once are fine:
    they share the one client. Inside a running event loop (async code, Jupyter) it
    refuses to start or to call, with an `EventLoopError`: use `FluxClient` there.

    Example::

        from flux_async import SyncFluxClient

        with SyncFluxClient(api_key="sk-...", base_url="https://gateway/v1") as client:
            response = client.generate("a lighthouse at dusk", aspect_ratio="16:9")
            print(response.urls)
            results = client.gather_generate(["a fox", "a crow"], concurrency=8)
            client.save(response, "out", stem="lighthouse")  # out/lighthouse.png
    """

    def __init__(self, **options: Any) -> None:
        _refuse_in_loop()
        # Built here, in the caller's thread: FluxClient's constructor only validates (no
        # I/O, no loop), so a bad argument raises before any thread is started.
        self._client = FluxClient(**options)
        self._runner = _LoopThread()
        self._finalizer = weakref.finalize(self, _shutdown, self._runner, self._client)

    @property
    def base_url(self) -> str:
        """The base URL calls go to.

        Example::

            SyncFluxClient(base_url="http://127.0.0.1:8000/v1").base_url
        """
        return self._client.base_url

    @property
    def closed(self) -> bool:
        """True once `close` has run.

        Example::

            with SyncFluxClient() as client: ...
            assert client.closed
        """
        return not self._finalizer.alive

    def _run(self, coro: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        # Takes a function making the coroutine, not the coroutine: one made and then
        # refused here would warn "coroutine was never awaited".
        _refuse_in_loop()
        if not self._finalizer.alive:
            raise ClientClosedError("this SyncFluxClient is closed; create a new one")
        return self._runner.run(coro())

    def build_request(
        self, prompt: str | ImageRequest, fields: Mapping[str, Any] | None = None
    ) -> ImageRequest:
        """Validate ``prompt`` plus ``fields`` into an `ImageRequest` (no I/O); see
        `FluxClient.build_request`.

        Example::

            request = client.build_request("a fox", {"n": 2})
        """
        return self._client.build_request(prompt, fields)

    def generate(
        self,
        prompt: str | ImageRequest,
        *,
        retry: RetryPolicy | None = None,
        deadline: float | None = None,
        timeout: Timeout | None = None,
        idempotency_key: str | None = None,
        **fields: Unpack[RequestFields],
    ) -> ImagesResponse:
        """Generate images for one prompt and return the response; see
        `FluxClient.generate` for the arguments.

        Example::

            response = client.generate("a red fox", aspect_ratio="16:9", n=2)
            print(response.urls)
        """
        return self._run(
            lambda: self._client.generate(
                prompt,
                retry=retry,
                deadline=deadline,
                timeout=timeout,
                idempotency_key=idempotency_key,
                **fields,
            )
        )

    def gather_generate(
        self,
        prompts: Iterable[PromptInput],
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        rate_limit: float | None = None,
        per: float = 1.0,
        burst: int = 1,
        limiter: Limiter | None = None,
        retry: RetryPolicy | None = None,
        deadline: float | None = None,
        batch_deadline: float | None = None,
        timeout: Timeout | None = None,
        fail_fast: bool = False,
        on_progress: Callable[[FanoutStatistics], None] | None = None,
        save_to: str | os.PathLike[str] | None = None,
        save_stem: Callable[[int, str], str] | None = None,
        stop_on: Collection[int] = DEFAULT_STOP_ON,
        **fields: Unpack[RequestFields],
    ) -> list[GenerationResult]:
        """Generate for every prompt; one `GenerationResult` per prompt, in input order.

        The prompts run concurrently on the client's loop; see
        `FluxClient.gather_generate` for the arguments. ``on_progress`` is called in the
        client's thread, not the caller's.

        Example::

            results = client.gather_generate(["a fox", "a crow"], concurrency=32)
            urls = [r.response.urls for r in results if r.ok]
        """
        return self._run(
            lambda: self._client.gather_generate(
                prompts,
                concurrency=concurrency,
                rate_limit=rate_limit,
                per=per,
                burst=burst,
                limiter=limiter,
                retry=retry,
                deadline=deadline,
                batch_deadline=batch_deadline,
                timeout=timeout,
                fail_fast=fail_fast,
                on_progress=on_progress,
                save_to=save_to,
                save_stem=save_stem,
                stop_on=stop_on,
                **fields,
            )
        )

    @overload
    def save(self, target: Image, path: str | os.PathLike[str]) -> Path: ...

    @overload
    def save(
        self, target: ImagesResponse, path: str | os.PathLike[str], *, stem: str = ...
    ) -> list[Path]: ...

    def save(
        self,
        target: Image | ImagesResponse,
        path: str | os.PathLike[str],
        *,
        stem: str | None = None,
    ) -> Path | list[Path]:
        """Save an `Image` to the file ``path``, or every image of an `ImagesResponse`
        into the directory ``path``; return what was written. See `FluxClient.save`.

        Example::

            response = client.generate("a red fox", n=2)
            paths = client.save(response, "out", stem="fox")   # out/fox-0.png ...
            path = client.save(response.data[0], "best.png")   # best.png
        """
        # The implementation behind FluxClient.save's overloads takes either target, and
        # checks the pair itself (a stem with one Image is a ValidationError).
        save: Callable[..., Coroutine[Any, Any, Path | list[Path]]] = self._client.save
        return self._run(lambda: save(target, path, stem=stem))

    def close(self) -> None:
        """Close the client and stop its thread and loop. Safe to call twice.

        Example::

            client = SyncFluxClient()
            try:
                client.generate("x")
            finally:
                client.close()
        """
        self._finalizer()

    def __enter__(self) -> SyncFluxClient:
        if not self._finalizer.alive:
            raise ClientClosedError("this SyncFluxClient is closed; create a new one")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        # The async client's repr says whether it is closed (and never shows the key).
        return f"<SyncFluxClient {self._client!r}>"

"""`FluxClient`: the public calls over the client-wide state its settings resolve to
(limiter, retry budget, outage guard, the pool). A call goes to ``_attempt.py``, a
fan-out to ``_fanout.py``; the settings are checked in ``_client_settings.py``.

The path of one attempt is in ``_attempt.py`` and ``docs/design.md``: outage guard →
concurrency slot (fan-out only) → the limiter's pause gate and pacing permit → POST with
the attempt's timeout and a capped read → release the slot → tell the limiter, the
outage guard and the retry budget what happened → return, retry or raise. Nothing is
held across a backoff sleep.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack, overload

import aiohttp

from ._attempt import run_request
from ._client_settings import (
    DEFAULT_BASE_URL,
    ENV_API_KEY,
    ENV_BASE_URL,
    check_idempotency_key,
    client_settings,
)
from ._config import DEFAULT_TIMEOUT, Timeout, check_timeout
from ._exceptions import ClientClosedError
from ._fanout import (
    DEFAULT_CONCURRENCY,
    DEFAULT_STOP_ON,
    Fanout,
    FanoutStatistics,
    GenerationResult,
    PromptInput,
    gather_results,
)
from ._fanout_settings import fanout_settings
from ._limits import Limiter
from ._models import DEFAULT_MODEL, Image, ImageRequest, ImagesResponse, make_request, save_to_path
from ._outage import OutageGuard
from ._prompts import checked_requests
from ._retry import RetryBudget, RetryPolicy, call_policy
from ._save import DEFAULT_MAX_IMAGE_BYTES, Downloader
from ._status_errors import status_errors
from ._transport import DEFAULT_MAX_CONNECTIONS, AsyncTransport, VerifySetting

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "FluxClient",
    "RequestFields",
]


class RequestFields(TypedDict, total=False):
    """Keyword fields accepted by `FluxClient.generate` and the fan-out calls.

    Each one is a field of `ImageRequest`, validated the same way. The fields themselves
    are declared on `ImageRequest`; this repeats their names and types for type checkers
    (a test fails when the two differ).

    Example::

        fields: RequestFields = {"aspect_ratio": "16:9", "n": 2}
        await client.generate("a fox", **fields)
    """

    model: str
    n: int
    aspect_ratio: str | None
    size: str | None
    quality: str | None
    response_format: str | None
    style: str | None
    user: str | None
    input_images: Sequence[str]
    extra_body: Mapping[str, Any] | None


class FluxClient:
    """Async client for an OpenAI-format ``/v1/images/generations`` endpoint.

    ``api_key`` and ``base_url`` fall back to ``$FLUX_API_KEY`` and ``$FLUX_BASE_URL``
    (then ``https://api.chainhub.tech/v1``: like the openai package's, it ends in ``/v1``);
    ``model`` is the default model. ``retry``, ``retry_budget``, ``limiter`` (an adaptive
    `RateLimiter` unless given), ``outage``, ``timeout`` and ``max_response_bytes`` shape
    every call (docs/guides/rate-limits-and-retries.md); ``max_image_bytes`` caps one image
    that `save` or ``save_to=`` downloads or decodes (`DEFAULT_MAX_IMAGE_BYTES`);
    ``max_connections``, ``trust_env``, ``proxy`` and ``verify`` set up the pool the client
    makes, which a ``transport`` (such as `MockTransport`) or a ``session`` of yours
    replaces (docs/guides/web-apps.md, also on event loops: a client serves one at a time).
    ``default_headers`` go with every call.

    Example::

        async with FluxClient(api_key="sk-...", base_url="https://gateway/v1") as client:
            response = await client.generate("a lighthouse at dusk", aspect_ratio="16:9")
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        model: str = DEFAULT_MODEL,
        retry: RetryPolicy | None = None,
        retry_budget: RetryBudget | None = None,
        limiter: Limiter | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        session: aiohttp.ClientSession | None = None,
        transport: AsyncTransport | None = None,
        default_headers: Mapping[str, str] | None = None,
        outage: OutageGuard | None = None,
        max_response_bytes: int | None = None,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        trust_env: bool = True,
        proxy: str | None = None,
        verify: VerifySetting = True,
    ) -> None:
        self._settings = settings = client_settings(
            api_key=api_key,
            base_url=base_url,
            model=model,
            retry=retry,
            retry_budget=retry_budget,
            limiter=limiter,
            timeout=timeout,
            max_connections=max_connections,
            session=session,
            transport=transport,
            default_headers=default_headers,
            outage=outage,
            max_response_bytes=max_response_bytes,
            max_image_bytes=max_image_bytes,
            trust_env=trust_env,
            proxy=proxy,
            verify=verify,
        )
        self.model = settings.model
        self.retry = settings.retry
        self.retry_budget = settings.retry_budget
        self.limiter: Limiter = settings.limiter
        self.outage = settings.outage
        self.timeout = settings.timeout
        self._closed = False
        errors = status_errors(settings, lambda: self.model)
        self._context = settings.call_context(lambda: self._closed, errors)

    @property
    def base_url(self) -> str:
        """The base URL calls go to (ending in ``/v1`` by convention).

        Example::

            FluxClient(base_url="http://127.0.0.1:8000/v1").base_url
        """
        return str(self._settings.base_url)

    @property
    def closed(self) -> bool:
        """True once `aclose` has run; the client cannot be used again.

        Example::

            assert client.closed  # after `aclose` or leaving ``async with client``
        """
        return self._closed

    async def __aenter__(self) -> FluxClient:
        if self._closed:
            raise ClientClosedError("this FluxClient is closed; create a new one")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the transport (and the pool, if the client made it). Safe to call twice.

        Example::

            await client.aclose()
        """
        self._closed = True
        await self._settings.transport.aclose()

    @property
    def downloader(self) -> Downloader:
        """The `Downloader` that saves this client's images (the key only to its origin).

        Example::

            body, content_type, attempts = await client.downloader.fetch(image.url)
        """
        return self._settings.downloader(self.retry, self.timeout, lambda: self._closed)

    @overload
    async def save(self, target: Image, path: str | os.PathLike[str]) -> Path: ...

    @overload
    async def save(
        self, target: ImagesResponse, path: str | os.PathLike[str], *, stem: str = ...
    ) -> list[Path]: ...

    async def save(
        self,
        target: Image | ImagesResponse,
        path: str | os.PathLike[str],
        *,
        stem: str | None = None,
    ) -> Path | list[Path]:
        """Save an `Image` to the file ``path``, or an `ImagesResponse`'s images into the
        directory ``path`` (named ``stem``, ``stem-0`` ...); return the paths written.

        Example::

            paths = await client.save(response, "out", stem="fox")   # out/fox-0.png ...
        """
        return await save_to_path(target, path, stem, self)

    @property
    def transport(self) -> AsyncTransport:
        """The transport every attempt goes through.

        Example::

            FluxClient(transport=MockTransport(handler)).transport
        """
        return self._settings.transport

    def __repr__(self) -> str:
        key = "set" if self._settings.api_key is not None else "none"
        state = " closed" if self._closed else ""
        url = self._settings.safe_url
        return f"<FluxClient base_url={url!r} model={self.model!r} api_key={key}{state}>"

    def build_request(
        self, prompt: str | ImageRequest, fields: Mapping[str, Any] | None = None
    ) -> ImageRequest:
        """Validate ``prompt`` plus ``fields`` into an `ImageRequest`, with this client's
        ``model`` unless ``fields`` names one (no I/O).

        Example::

            request = client.build_request("a fox", {"n": 2})
        """
        return make_request(prompt, fields, self.model)

    async def generate(
        self,
        prompt: str | ImageRequest,
        *,
        retry: RetryPolicy | None = None,
        deadline: float | None = None,
        timeout: Timeout | None = None,
        idempotency_key: str | None = None,
        **fields: Unpack[RequestFields],
    ) -> ImagesResponse:
        """Generate images for one prompt; retried and rate limited per the client.

        ``fields``: `ImageRequest` fields, validated first; ``retry`` overrides the
        client's policy, ``deadline`` bounds the call, ``timeout`` each attempt. Every
        attempt carries the same ``Idempotency-Key`` (random unless given).

        Example::

            response = await client.generate("a red fox", aspect_ratio="16:9", n=2)
        """
        check_timeout(timeout)
        check_idempotency_key(idempotency_key)
        request = self.build_request(prompt, fields)
        policy = call_policy(self.retry, retry, deadline)
        call_timeout = self.timeout if timeout is None else timeout
        response, _ = await run_request(
            self._context, request, policy, call_timeout, idempotency_key
        )
        return response

    def iter_generate(
        self,
        prompts: Iterable[PromptInput] | AsyncIterable[PromptInput],
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
    ) -> Fanout:
        """Generate for many prompts; yields a `GenerationResult` per prompt as each ends.

        ``prompts`` (strings, `ImageRequest` s or mappings of fields) are read lazily, in
        O(concurrency) memory. Every argument, with its default: docs/guides/bulk.md.

        Example::

            async with client.iter_generate(prompts, concurrency=64, rate_limit=50) as results:
                async for result in results:
                    print(result.index, result.ok)
        """
        settings = fanout_settings(
            self,
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
            fields=fields,
        )
        return Fanout(self._context, self.build_request, prompts, settings)

    async def gather_generate(
        self,
        prompts: Iterable[PromptInput] | AsyncIterable[PromptInput],
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

        Takes the same arguments as `iter_generate`; every prompt is validated before
        anything is sent (a bad one raises `ValidationError` naming its index).

        Example::

            results = await client.gather_generate(["a fox", "a crow"], concurrency=32)
        """
        requests = await checked_requests(self.build_request, prompts, fields)
        fanout = self.iter_generate(
            requests,
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
        )
        return await gather_results(fanout, requests, batch_deadline)

"""`FluxClient`: owns the connection pool and the client-wide state (limiter, retry
budget, outage guard), validates requests, and hands each call to ``_attempt.py``.

The path of one attempt is in ``_attempt.py`` and ``docs/design.md``: outage guard →
concurrency slot (fan-out only) → the limiter's pause gate and pacing permit → POST with
the attempt's timeout and a capped read → release the slot → tell the limiter, the
outage guard and the retry budget what happened → return, retry or raise. Nothing is
held across a backoff sleep.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import sys
import warnings
from collections.abc import AsyncIterable, Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack, overload

import aiohttp
import attrs
import yarl

from ._attempt import CallContext, run_request
from ._config import DEFAULT_TIMEOUT, Timeout, check_timeout
from ._exceptions import (
    APIError,
    ClientClosedError,
    DeadlineExceededError,
    EventLoopError,
    ValidationError,
    error_body,
    error_for_status,
)
from ._fanout import (
    DEFAULT_CONCURRENCY,
    DEFAULT_STOP_ON,
    Fanout,
    FanoutSettings,
    FanoutStatistics,
    GenerationResult,
    PromptInput,
    check_stop_on,
    fanout_limiter,
    save_settings,
    to_request,
)
from ._limits import Limiter, RateLimiter
from ._models import DEFAULT_MODEL, Image, ImageRequest, ImagesResponse
from ._outage import OutageGuard
from ._retry import RetryBudget, RetryPolicy, parse_retry_after
from ._save import Downloader
from ._transport import (
    DEFAULT_MAX_CONNECTIONS,
    AiohttpTransport,
    AsyncTransport,
    VerifySetting,
)
from ._version import __version__

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "FluxClient",
    "RequestFields",
]

ENV_API_KEY = "FLUX_API_KEY"
ENV_BASE_URL = "FLUX_BASE_URL"
#: The contract's server, with the ``/v1`` that OpenAI-style base URLs end in.
DEFAULT_BASE_URL = "https://api.chainhub.tech/v1"

_USER_AGENT = f"flux-async/{__version__} python/{sys.version_info[0]}.{sys.version_info[1]}"
_ENDPOINT = "images/generations"
_JSON_TYPES = ("application/json", "application/problem+json")


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


# The pool's network settings and their defaults (see AiohttpTransport).
_NETWORK_DEFAULTS: dict[str, object] = {"trust_env": True, "proxy": None, "verify": True}

# From ImageRequest itself, not from the TypedDict above, which only mirrors it.
_REQUEST_FIELDS = frozenset(a.name for a in attrs.fields(ImageRequest) if a.init) - {"prompt"}


class _Secret:
    """Holds the API key so that no repr, log line or traceback local shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


def _check_base_url(value: str) -> yarl.URL:
    try:
        url = yarl.URL(value)
    except (TypeError, ValueError) as exc:
        raise ValidationError("base_url", value, f"an http(s) URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValidationError(
            "base_url", value, "an http:// or https:// URL such as 'https://api.example.com/v1'"
        )
    return url


def _is_loopback(host: str) -> bool:
    """True for a host whose traffic never leaves the machine: 127.0.0.0/8, ::1, localhost."""
    host = host.rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _header_safe(text: str) -> bool:
    # A CR or LF would end the header line (aiohttp refuses it at send time, per prompt).
    return "\r" not in text and "\n" not in text and "\x00" not in text


def _check_default_headers(headers: object) -> None:
    if headers is None:
        return
    if not isinstance(headers, Mapping):
        raise ValidationError("default_headers", headers, "a mapping of header names to values")
    for name, value in headers.items():
        if not isinstance(name, str) or not name.strip() or not _header_safe(name):
            raise ValidationError("default_headers", name, "header names: non-empty strings")
        if not isinstance(value, str) or not _header_safe(value):
            # Header values are often keys: never shown.
            raise ValidationError(
                f"default_headers[{name!r}]",
                "<redacted>",
                "a string without CR, LF or NUL characters",
            )


def _api_key(api_key: object) -> str | None:
    """The key given, else ``$FLUX_API_KEY``, checked (and never shown in an error)."""
    if api_key is None:
        api_key = os.environ.get(ENV_API_KEY) or None
    if api_key is None:
        return None
    if not isinstance(api_key, str) or not api_key.strip():
        raise ValidationError("api_key", "<redacted>", "a non-empty string, or None")
    if api_key != api_key.strip() or not _header_safe(api_key):
        # Typically a key read from a file with its newline: it would fail every call.
        raise ValidationError(
            "api_key",
            "<redacted>",
            "a key without surrounding whitespace or line breaks (strip the key you read)",
        )
    return api_key


def _check_settings(
    *,
    timeout: object,
    retry: object,
    retry_budget: object,
    limiter: object,
    outage: object,
    max_response_bytes: object,
) -> None:
    """Every client setting of the right type, before anything else happens."""
    check_timeout(timeout, optional=False)
    for name, value, kind in (
        ("retry", retry, RetryPolicy),
        ("retry_budget", retry_budget, RetryBudget),
        ("limiter", limiter, Limiter),
        ("outage", outage, OutageGuard),
    ):
        if value is not None and not isinstance(value, kind):
            raise ValidationError(name, value, f"a flux_async.{kind.__name__}, or None")
    if max_response_bytes is not None and (
        type(max_response_bytes) is not int or max_response_bytes < 1024
    ):
        raise ValidationError(
            "max_response_bytes", max_response_bytes, "an integer >= 1024, or None"
        )


def _warn_if_not_loopback(url: yarl.URL) -> None:
    if not _is_loopback(url.host or ""):
        warnings.warn(
            f"FluxClient sends credentials to {url.host} over plain http://: the API key "
            "would cross the network in clear text. Use an https:// base_url (plain "
            "http is fine for a server on this machine: localhost, 127.0.0.1, ::1).",
            UserWarning,
            stacklevel=3,
        )


def _headers(default_headers: Mapping[str, str] | None, key: _Secret | None) -> dict[str, str]:
    """The headers every request carries: content negotiation, ours, the caller's, auth."""
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": _USER_AGENT,
    }
    if default_headers:
        headers.update(default_headers)
    if key is not None:
        headers["Authorization"] = f"Bearer {key.reveal()}"
    return headers


def _transport(
    transport: object,
    session: object,
    max_connections: object,
    headers: Mapping[str, str],
    network: Mapping[str, Any],
) -> AsyncTransport:
    """The transport given, or an `AiohttpTransport` (over the caller's session, if any).

    ``network`` holds ``trust_env``, ``proxy`` and ``verify``: settings of the pool the
    client makes, refused (rather than silently ignored) with a transport of the caller's.
    """
    if transport is None:
        if session is not None and not isinstance(session, aiohttp.ClientSession):
            raise ValidationError("session", session, "an aiohttp.ClientSession, or None")
        if type(max_connections) is not int or max_connections < 0:
            raise ValidationError(
                "max_connections", max_connections, "an integer >= 0 (0 means no limit)"
            )
        # With session=, AiohttpTransport refuses non-default network settings itself.
        return AiohttpTransport(
            max_connections=max_connections, session=session, default_headers=headers, **network
        )
    if not isinstance(transport, AsyncTransport):
        raise ValidationError("transport", transport, "a flux_async.AsyncTransport, or None")
    for name, default in _NETWORK_DEFAULTS.items():
        value = network[name]
        if value is not default:
            raise ValidationError(
                name,
                value,
                f"the default ({default}) when transport= is given: set it on the "
                f"transport, e.g. AiohttpTransport({name}=...)",
            )
    if session is not None:
        raise ValidationError(
            "session", session, "None when a transport is given (give it the session)"
        )
    return transport


class FluxClient:
    """Async client for an OpenAI-format ``/v1/images/generations`` endpoint.

    * ``api_key``: falls back to ``$FLUX_API_KEY``; when neither is set no
      ``Authorization`` header is sent (fine for the emulator).
    * ``base_url``: falls back to ``$FLUX_BASE_URL``, then ``https://api.chainhub.tech/v1``.
      Like the openai package, it ends in ``/v1``; ``/images/generations`` is appended.
    * ``model``: the default model for every call (``flux-kontext-pro``).
    * ``retry``: the `RetryPolicy`; ``retry_budget``: the client-wide `RetryBudget`.
    * ``limiter``: the `Limiter` every attempt passes (default: an adaptive `RateLimiter`
      with no ceiling, so a 429 pauses every call on this client). Share one between
      clients to share a quota.
    * ``outage``: the `OutageGuard` that holds attempts while the server is down (one
      per client by default; share one between clients of the same server).
    * ``timeout``: per-attempt `Timeout`; ``max_connections``: the pool's size (1000,
      as openai-python: a web app's handlers sharing one client never queue for one).
    * ``trust_env`` (True): proxies from ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY``,
      ``NO_PROXY`` honoured; ``proxy``: one proxy URL for every request (it wins over the
      environment); ``verify`` (True): TLS certificates checked against the system's CA
      store, or False, a CA bundle path, or an ``ssl.SSLContext``. Settings of the pool
      the client makes: with ``transport=`` or ``session=``, set them there instead.
    * ``max_response_bytes``: the most bytes read from one answer (default 4 MiB, plus
      24 MiB per image with ``response_format="b64_json"``); a larger 2xx body is an
      `APIResponseValidationError`, a larger error body is cut to an excerpt.
    * ``transport``: the `AsyncTransport` every attempt goes through: by default an
      `AiohttpTransport` pool of ``max_connections``, made lazily in the running loop and
      closed by `aclose` / ``async with``; `MockTransport` tests your code with no
      sockets. ``session``: an ``aiohttp.ClientSession`` of yours, used as is (through an
      `AiohttpTransport`) and never closed by us.

    One client serves one event loop at a time. A module-level client may be used by
    successive ``asyncio.run`` calls (each loop's pool is closed as the loop ends and the
    next loop gets a new one); use from a second loop while the first is still open raises
    `EventLoopError`.

    Example::

        async with FluxClient(api_key="sk-...", base_url="https://gateway/v1") as client:
            response = await client.generate("a lighthouse at dusk", aspect_ratio="16:9")
            print(response.urls)

        behind_a_proxy = FluxClient(proxy="http://proxy.internal:3128",
                                    verify="/etc/ssl/corp-root.pem")
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
        trust_env: bool = True,
        proxy: str | None = None,
        verify: VerifySetting = True,
    ) -> None:
        api_key = _api_key(api_key)
        url = _check_base_url(base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL)
        _check_settings(
            timeout=timeout,
            retry=retry,
            retry_budget=retry_budget,
            limiter=limiter,
            outage=outage,
            max_response_bytes=max_response_bytes,
        )
        _check_default_headers(default_headers)
        # Validate the default model the same way a request would, before any I/O.
        ImageRequest(prompt="x", model=model)
        if (api_key is not None or url.user) and url.scheme == "http":
            _warn_if_not_loopback(url)
        self._base_url = url
        self._url = url.joinpath(_ENDPOINT) if url.path != "/" else url.with_path("/" + _ENDPOINT)
        # Logged and put in errors: never with user:password@ in it.
        self._safe_url = str(self._url.with_user(None).with_query(None))
        self._api_key = _Secret(api_key) if api_key is not None else None
        self.model = model
        self.retry = retry if retry is not None else RetryPolicy()
        self.retry_budget = retry_budget if retry_budget is not None else RetryBudget()
        self.limiter: Limiter = limiter if limiter is not None else RateLimiter()
        self.outage = outage if outage is not None else OutageGuard()
        self.timeout = timeout
        self._closed = False
        self._headers = _headers(default_headers, self._api_key)
        self._transport = _transport(
            transport,
            session,
            max_connections,
            self._headers,
            {"trust_env": trust_env, "proxy": proxy, "verify": verify},
        )
        # The event loop this client is busy in (see `_check_loop`).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._label = f"POST {self._safe_url}"
        self._key_prefix = f"flux-async-{os.urandom(8).hex()}-"
        self._keys = itertools.count(1)
        self._max_response_bytes = max_response_bytes
        self._context = self._make_context()

    def _make_context(self) -> CallContext:
        """Everything a call needs from this client, in one frozen object."""
        prefix = self._key_prefix
        keys = self._keys

        def new_key() -> str:
            # A random per-client prefix and a counter: unique across processes like a
            # UUID, at a tenth of the cost on a path a batch runs a million times.
            return f"{prefix}{next(keys)}"

        def status_error(
            status: int, raw: bytes, headers: Mapping[str, str], request_id: str | None
        ) -> APIError:
            return self._status_error(status, raw, headers, request_id, self.limiter, False)

        return CallContext(
            label=self._label,
            url=str(self._url),
            transport=self._transport,
            headers=self._headers,
            is_closed=lambda: self._closed,
            new_key=new_key,
            limiter=self.limiter,
            budget=self.retry_budget,
            outage=self.outage,
            status_error=status_error,
            max_response_bytes=self._max_response_bytes,
            check_loop=self._check_loop,
        )

    def _check_loop(self) -> None:
        """Bind to the running loop, unless the client is bound to another, still open one.

        A loop that has closed (each ``asyncio.run`` closes its own) leaves nothing behind
        to share: the limiter rebinds to the new clock and the transport makes a new pool.
        Another loop still open may be using the same limiter, retry budget and pool from
        its own thread; sharing them would corrupt them, so it is refused, before anything
        is touched.
        """
        loop = asyncio.get_running_loop()
        bound = self._loop
        if loop is bound:
            return
        if bound is not None and not bound.is_closed():
            raise EventLoopError(
                "this FluxClient is in use by another event loop, which is still open: "
                "create one FluxClient per event loop (or per thread running one), or "
                "close the other loop first (asyncio.run closes its loop when it returns)"
            )
        self._loop = loop

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The base URL calls go to (ending in ``/v1`` by convention).

        Example::

            FluxClient(base_url="http://127.0.0.1:8000/v1").base_url
        """
        return str(self._base_url)

    @property
    def closed(self) -> bool:
        """True once `aclose` has run; the client cannot be used again.

        Example::

            async with FluxClient() as client: ...
            assert client.closed
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

            client = FluxClient()
            try:
                await client.generate("x")
            finally:
                await client.aclose()
        """
        self._closed = True
        await self._transport.aclose()

    @property
    def downloader(self) -> Downloader:
        """What saves this client's images: `Image.save`, `ImagesResponse.save`, `save`
        and ``save_to=`` use it. Downloads go through this client's transport (its pool)
        with its retry policy and timeout; the API key is sent only to URLs on
        ``base_url``'s own scheme, host and port.

        Example::

            body, content_type, attempts = await client.downloader.fetch(image.url)
        """
        return Downloader(
            transport=self._transport,
            policy=self.retry,
            api_origin=str(self._base_url.origin()),
            api_headers=self._headers,
            timeout=self.timeout,
            is_closed=lambda: self._closed,
        )

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
        """Save an `Image` to the file ``path``, or every image of an `ImagesResponse`
        into the directory ``path`` (named ``stem``, default ``"image"``, or ``stem-0``,
        ``stem-1`` ... for several); return what was written.

        A ``url`` image is downloaded through this client (its pool, its retry policy; the
        key only to the API's own origin), a ``b64_json`` one decoded; the suffix comes
        from the bytes (PNG, JPEG or WebP), the write is atomic. Same as
        ``image.save(path, client=client)`` and ``response.save(dir, client=client)``.

        Example::

            response = await client.generate("a red fox", n=2)
            paths = await client.save(response, "out", stem="fox")   # out/fox-0.png ...
            path = await client.save(response.data[0], "best.png")   # best.png
        """
        if isinstance(target, Image):
            if stem is not None:
                raise ValidationError("stem", stem, "None when saving one Image (name it in path)")
            return await target.save(path, client=self)
        if isinstance(target, ImagesResponse):
            return await target.save(path, stem="image" if stem is None else stem, client=self)
        raise ValidationError("target", target, "an Image or an ImagesResponse to save")

    @property
    def transport(self) -> AsyncTransport:
        """The transport every attempt goes through.

        Example::

            FluxClient(transport=MockTransport(handler)).transport
        """
        return self._transport

    def __repr__(self) -> str:
        key = "set" if self._api_key is not None else "none"
        state = " closed" if self._closed else ""
        return f"<FluxClient base_url={self._safe_url!r} model={self.model!r} api_key={key}{state}>"

    # -- requests ----------------------------------------------------------------------

    def build_request(
        self, prompt: str | ImageRequest, fields: Mapping[str, Any] | None = None
    ) -> ImageRequest:
        """Validate ``prompt`` plus ``fields`` into an `ImageRequest` (no I/O).

        A string prompt gets this client's ``model`` unless ``fields`` names one; an
        `ImageRequest` is used as it is, with ``fields`` applied over it.

        Example::

            request = client.build_request("a fox", {"n": 2})
        """
        if fields:
            unknown = set(fields) - _REQUEST_FIELDS
            if unknown:
                name = sorted(unknown)[0]
                raise ValidationError(
                    name,
                    fields[name],
                    "a request field: one of "
                    + ", ".join(sorted(_REQUEST_FIELDS))
                    + " (provider-specific fields go in extra_body)",
                )
        if isinstance(prompt, ImageRequest):
            # _evolve: a ratio the request only had by default follows a new size.
            return prompt._evolve(fields) if fields else prompt
        if fields:
            if "model" in fields:
                return ImageRequest(prompt=prompt, **fields)
            return ImageRequest(prompt=prompt, model=self.model, **fields)
        return ImageRequest(prompt=prompt, model=self.model)

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

        ``fields`` are `ImageRequest` fields (``n``, ``aspect_ratio``, ``size`` ...),
        validated before anything is sent. ``retry`` overrides the client's policy for
        this call, ``deadline`` bounds the call (seconds, retries included), ``timeout``
        each attempt. Every attempt of the call carries the same ``Idempotency-Key``
        (random unless given), so servers that de-duplicate bill once. ``n`` above 10 is
        sent as several concurrent requests whose images are joined in order.

        Example::

            response = await client.generate("a red fox", aspect_ratio="16:9", n=2)
            print(response.urls)
        """
        check_timeout(timeout)
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str)
            or not idempotency_key.strip()
            or not _header_safe(idempotency_key)
        ):
            raise ValidationError(
                "idempotency_key", idempotency_key, "a non-empty string without line breaks"
            )
        request = self.build_request(prompt, fields)
        policy = self._policy(retry, deadline)
        client_timeout = self.timeout if timeout is None else timeout
        response, _ = await run_request(
            self._context, request, policy, client_timeout, idempotency_key
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

        ``prompts`` may be any iterable or async iterable of strings, `ImageRequest` s
        or mappings of request fields; it is consumed lazily, so a million prompts from
        a file take O(concurrency) memory. ``fields`` apply to string and mapping items
        (a mapping's own keys win); an `ImageRequest` is sent as it is.

        * ``concurrency`` (16): HTTP attempts on the wire at once.
        * ``rate_limit`` requests per ``per`` seconds (``per=60``: per minute), with
          ``burst``: a ceiling that is never exceeded; without it the client's limiter
          is used (adaptive: a 429's ``Retry-After`` pauses everyone and cuts the rate).
          ``limiter`` passes a `Limiter` of your own (shared by several fan-outs).
        * ``deadline``: seconds per prompt, retries included; ``batch_deadline``: seconds
          for the whole run, after which running prompts end with
          `DeadlineExceededError` and no new ones start.
        * ``fail_fast``: the first prompt that fails for good is raised from the
          iteration and the rest are cancelled; otherwise failures are yielded as results.
        * ``on_progress``: called with a `FanoutStatistics` after each prompt ends.
        * ``save_to``: a directory; each prompt's images are saved there right after its
          generation succeeds (before a URL can expire), named ``save_stem(index,
          prompt)`` (default: the index, six digits: ``000042.png``, or ``000042-0.png``
          ... for ``n`` > 1) plus the suffix of their type; `GenerationResult.files` has
          the paths. Downloads go through this client's pool (using its connections
          beyond ``concurrency``: ``max_connections`` of 2x ``concurrency`` is ample) and
          retry as API calls do; a prompt whose images cannot be saved ends with an
          `ImageSaveError` that keeps the response and its URLs.
        * ``stop_on`` (401, 403, 404): answers every other prompt would get too. The first
          one stops the fan-out: no prompt is sent after it (at most ``concurrency``
          were already on the wire), and every prompt not sent ends at once with a
          `BatchStoppedError` naming it; `Fanout.stopped_by` is that answer. Pass ``()``
          never to stop. A 400 (one prompt's content) never stops a batch.

        Example::

            def prompts() -> Iterator[str]:
                with open("prompts.txt") as lines:
                    yield from (line.strip() for line in lines if line.strip())

            async with client.iter_generate(prompts(), concurrency=64, rate_limit=50) as results:
                async for result in results:
                    print(result.index, result.ok)
        """
        pool = (
            self._transport.max_connections
            if isinstance(self._transport, AiohttpTransport)
            else None
        )
        own_limiter = fanout_limiter(
            concurrency=concurrency,
            rate_limit=rate_limit,
            per=per,
            burst=burst,
            limiter=limiter,
            deadline=deadline,
            batch_deadline=batch_deadline,
            timeout=timeout,
            fail_fast=fail_fast,
            on_progress=on_progress,
            pool=pool,
        )
        stop_statuses = check_stop_on(stop_on)
        policy = self._policy(retry, deadline)
        client_timeout = self.timeout if timeout is None else timeout
        save = save_settings(
            save_to,
            save_stem,
            self.downloader.with_policy(policy, client_timeout),
            concurrency=concurrency,
            pool=pool,
        )
        # Batch-wide fields are checked once, now, not once per prompt later.
        self.build_request("check", fields)
        settings = FanoutSettings(
            concurrency=concurrency,
            limiter=self.limiter if own_limiter is None else own_limiter,
            policy=policy,
            timeout=client_timeout,
            fields={"model": self.model, **fields},
            fail_fast=fail_fast,
            batch_deadline=batch_deadline,
            on_progress=on_progress,
            save=save,
            stop_on=stop_statuses,
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

        Takes the same arguments as `iter_generate`. Every prompt is validated before
        anything is sent (a bad one raises `ValidationError` naming its index). The list
        always has one result per prompt: with ``batch_deadline``, prompts that never
        ran carry a `DeadlineExceededError`; after a ``stop_on`` answer, prompts not sent
        carry a `BatchStoppedError`. With ``fail_fast`` the first final error is raised
        instead.

        Example::

            results = await client.gather_generate(["a fox", "a crow"], concurrency=32)
            urls = [r.response.urls for r in results if r.ok]
            results = await client.gather_generate(prompts, save_to="out")
            files = [r.files for r in results if r.ok]   # (PosixPath('out/000000.png'),) ...
        """
        if isinstance(prompts, AsyncIterable):
            items: list[PromptInput] = [item async for item in prompts]
        elif isinstance(prompts, Iterable) and not isinstance(prompts, str | bytes | Mapping):
            items = list(prompts)
        else:
            raise ValidationError(
                "prompts", prompts, "an iterable of prompts (wrap a single prompt in a list)"
            )
        requests: list[ImageRequest] = []
        # Every string prompt shares the batch's fields: validate those once, then only
        # each prompt (the per-prompt cost of a million-prompt batch).
        template = self.build_request("x", fields)
        for index, item in enumerate(items):
            try:
                if isinstance(item, str):
                    requests.append(template.with_prompt(item))
                else:
                    requests.append(to_request(self.build_request, item, fields))
            except ValidationError as exc:
                exc.add_note(f"in prompt #{index} of {len(items)}; nothing was sent")
                raise
        results: list[GenerationResult | None] = [None] * len(requests)
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

        def collect(result: GenerationResult) -> None:
            results[result.index] = result

        await fanout.drain(collect)
        missing = DeadlineExceededError(
            f"the batch deadline of {batch_deadline}s passed before this prompt started",
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

    def _policy(self, retry: RetryPolicy | None, deadline: float | None) -> RetryPolicy:
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ValidationError("retry", retry, "a flux_async.RetryPolicy or None")
        policy = self.retry if retry is None else retry
        if deadline is not None:
            policy = attrs.evolve(policy, deadline=deadline)
        return policy

    def _status_error(
        self,
        status: int,
        raw: bytes,
        headers: Mapping[str, str],
        request_id: str | None,
        limiter: Limiter,
        pause: bool,
    ) -> APIError:
        retry_after = parse_retry_after(headers)
        if status == 429 and pause:
            limiter.on_rate_limited(retry_after)
        content_type = headers.get("Content-Type", "").lower()
        # Bounded and never raising, whatever the server sent (see APIStatusError.body).
        body = error_body(raw, expect_json=content_type.startswith(_JSON_TYPES) or raw[:1] == b"{")
        error = error_for_status(
            status, body, headers=headers, request_id=request_id, retry_after=retry_after
        )
        if status == 401 and self._api_key is None:
            error.add_note(
                f"No API key was sent: pass api_key= to FluxClient or set ${ENV_API_KEY}."
            )
        elif status == 401:
            error.add_note(
                f"The API key was refused: check api_key= / ${ENV_API_KEY}, and that "
                f"{self._safe_url} is the provider the key belongs to."
            )
        elif status == 403:
            error.add_note(
                "The key may not use this endpoint or model: check the key's access and "
                f"model= (this request's model, or the client's {self.model!r})."
            )
        elif status == 404:
            error.add_note(
                f"Check base_url: calls go to {self._safe_url}; OpenAI-style base URLs end in /v1."
            )
        return error

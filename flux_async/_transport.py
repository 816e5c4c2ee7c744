"""The transport seam: how one prepared request becomes one response.

The client never touches the network itself: every attempt hands a `TransportRequest`
to an `AsyncTransport` and gets a `TransportResponse` back. `AiohttpTransport` is the
default and owns the connection pool; `MockTransport` answers from a function of yours,
so code built on flux-async can be tested with no sockets at all::

    def handler(request: TransportRequest) -> TransportResponse:
        return TransportResponse(200, json={"created": 1, "data": [{"url": "https://x"}]})

    async with FluxClient(transport=MockTransport(handler)) as client:
        await client.generate("a fox")

A transport raises `APIConnectionError` (or `APITimeoutError`) when no response came back;
aiohttp's errors become ours here and nowhere else. Retries, pacing and error statuses
are the client's business, above the transport: a transport makes exactly one exchange.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import json as _json
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import aiohttp
import attrs
import yarl

from ._config import DEFAULT_TIMEOUT, Timeout
from ._exceptions import (
    ClientClosedError,
    EventLoopError,
    ValidationError,
    translate_aiohttp_error,
)

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "AiohttpTransport",
    "AsyncTransport",
    "MockTransport",
    "RequestHeaders",
    "TransportRequest",
    "TransportResponse",
]

DEFAULT_MAX_CONNECTIONS = 100
#: Bytes of one answer read at most, unless the request says otherwise: a real JSON
#: answer with image URLs is a few hundred bytes.
DEFAULT_MAX_RESPONSE_BYTES = 4 * 2**20
#: Bytes of an error body read at most: enough for any message, never a whole page.
ERROR_BODY_BYTES = 64 * 2**10
_EMPTY: Mapping[str, str] = MappingProxyType({})


class RequestHeaders(Mapping[str, str]):
    """A request's headers: a shared ``defaults`` mapping plus this request's ``extra``.

    Reads like one mapping (``extra`` wins). It exists so the default transport can send
    only ``extra`` over a pool whose session already carries the same ``defaults``:
    aiohttp merges headers key by key on every request, and a batch sends a million.

    Example::

        headers = RequestHeaders({"User-Agent": "x"}, {"Idempotency-Key": "k1"})
        dict(headers)  # {'User-Agent': 'x', 'Idempotency-Key': 'k1'}
    """

    __slots__ = ("defaults", "extra")

    def __init__(self, defaults: Mapping[str, str], extra: Mapping[str, str]) -> None:
        self.defaults = defaults
        self.extra = extra

    def __getitem__(self, key: str) -> str:
        if key in self.extra:
            return self.extra[key]
        return self.defaults[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.defaults
        yield from (key for key in self.extra if key not in self.defaults)

    def __len__(self) -> int:
        return len(self.defaults) + sum(1 for key in self.extra if key not in self.defaults)

    def __repr__(self) -> str:
        # Values may be keys: names only.
        return f"<RequestHeaders {sorted(self)}>"


@attrs.frozen(kw_only=True)
class TransportRequest:
    """One prepared HTTP request, exactly as it will be sent.

    ``headers`` are complete (``Authorization`` included, when a key is set: never log
    them); ``body`` is the encoded JSON; ``timeout`` bounds one attempt;
    ``max_response_bytes`` is the most of the answer a transport should read (a longer
    2xx body comes back ``truncated``).

    Example::

        def handler(request: TransportRequest) -> TransportResponse:
            assert request.json()["prompt"] == "a fox"
            return TransportResponse(200, json={"created": 1, "data": [{"url": "u"}]})
    """

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes = b""
    timeout: Timeout = DEFAULT_TIMEOUT
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES

    def json(self) -> Any:
        """The body, decoded.

        Example::

            request.json()["n"]
        """
        return _json.loads(self.body)

    def __repr__(self) -> str:
        # The headers carry the API key: a repr must never show them.
        return f"<TransportRequest {self.method} {_safe_url(self.url)} {len(self.body)} bytes>"


@attrs.frozen(init=False)
class TransportResponse:
    """One HTTP answer: ``status``, ``headers`` and the ``body`` as read.

    Build it with ``json=`` (encoded for you, with a JSON content type) or ``body=``.
    ``truncated`` is True when the body was longer than the request's
    ``max_response_bytes`` and only its first part (or, for a 2xx, nothing) was read.

    Example::

        TransportResponse(200, json={"created": 1, "data": [{"url": "https://x"}]})
        TransportResponse(503, headers={"Retry-After": "2"}, body=b"<html>busy</html>")
    """

    status: int
    headers: Mapping[str, str]
    body: bytes
    truncated: bool

    def __init__(
        self,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        body: bytes = b"",
        truncated: bool = False,
    ) -> None:
        if type(status) is not int or not 100 <= status <= 599:
            raise ValidationError("status", status, "an integer HTTP status from 100 to 599")
        if json is not None:
            if body:
                raise ValidationError("body", body, "empty when json= is given (pass one)")
            body = _json.dumps(json).encode()
            if headers is None:
                headers = {"Content-Type": "application/json"}
        elif not isinstance(body, bytes):
            raise ValidationError("body", body, "bytes (or pass json=)")
        self.__attrs_init__(
            status=status,
            headers=_EMPTY if headers is None else headers,
            body=body,
            truncated=truncated,
        )


def _answer(
    status: int, headers: Mapping[str, str], body: bytes, truncated: bool = False
) -> TransportResponse:
    """A `TransportResponse` from the wire, skipping the checks a hand-made one gets (the
    per-request path: aiohttp already parsed the status)."""
    response = object.__new__(TransportResponse)
    response.__attrs_init__(status=status, headers=headers, body=body, truncated=truncated)
    return response


class AsyncTransport(abc.ABC):
    """Sends one `TransportRequest`, returns its `TransportResponse`. Subclass to plug in.

    `send` must raise `APIConnectionError` (or its subclass `APITimeoutError`) when no
    answer came back, and return any answer that did, whatever its status. `aclose`
    releases what the transport holds; the client calls it from its own ``aclose``.

    Example::

        class Recording(AsyncTransport):
            def __init__(self, inner: AsyncTransport) -> None:
                self.inner, self.seen = inner, []

            async def send(self, request: TransportRequest) -> TransportResponse:
                self.seen.append(request)
                return await self.inner.send(request)

            async def aclose(self) -> None:
                await self.inner.aclose()
    """

    @abc.abstractmethod
    async def send(self, request: TransportRequest) -> TransportResponse:
        """Make one HTTP exchange."""

    async def aclose(self) -> None:  # noqa: B027 - a transport may hold nothing
        """Release what the transport holds (its pool). Safe to call twice."""


class MockTransport(AsyncTransport):
    """Answers every request with ``handler(request)``, sync or async: no sockets.

    The handler returns a `TransportResponse`, or raises `APIConnectionError` /
    `APITimeoutError` to play a network failure. Bodies over the request's
    ``max_response_bytes`` come back truncated, as from the real transport.

    Example::

        def handler(request: TransportRequest) -> TransportResponse:
            if request.json()["prompt"] == "fail":
                return TransportResponse(500, json={"error": {"message": "boom"}})
            return TransportResponse(200, json={"created": 1, "data": [{"url": "u"}]})

        client = FluxClient(transport=MockTransport(handler), retry=RetryPolicy.for_tests())
    """

    def __init__(
        self,
        handler: Callable[[TransportRequest], TransportResponse | Awaitable[TransportResponse]],
    ) -> None:
        if not callable(handler):
            raise ValidationError("handler", handler, "a function of a TransportRequest")
        self._handler = handler

    async def send(self, request: TransportRequest) -> TransportResponse:
        """Call the handler (awaiting it if it is async) and cap its body."""
        result = self._handler(request)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, TransportResponse):
            raise TypeError(
                f"the MockTransport handler returned {type(result).__name__}, "
                "not a TransportResponse"
            )
        cap = request.max_response_bytes if result.status < 300 else ERROR_BODY_BYTES
        if len(result.body) > cap:
            body = b"" if result.status < 300 else result.body[:cap]
            return TransportResponse(
                result.status, headers=result.headers, body=body, truncated=True
            )
        return result

    def __repr__(self) -> str:
        return f"<MockTransport handler={getattr(self._handler, '__name__', '?')}>"


class AiohttpTransport(AsyncTransport):
    """The default transport: an aiohttp pool of ``max_connections`` (0: no limit).

    The pool is made lazily, in the running event loop, and closed by `aclose`; one
    transport serves one event loop. ``default_headers`` are set on the session it makes,
    and a request whose headers are `RequestHeaders` over that same mapping sends only its
    own additions (the client does this: its constant headers, then one key per call).
    Pass ``session=`` to use an ``aiohttp.ClientSession``
    of yours instead: it is used as it is and never closed here. aiohttp never retries
    (the client's retry policy is the one retry layer), and its errors become
    `APIConnectionError` / `APITimeoutError` here, never carrying aiohttp objects (which
    can hold our request headers) as their cause or context.

    Example::

        transport = AiohttpTransport(max_connections=256)
        client = FluxClient(transport=transport)
    """

    def __init__(
        self,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        session: aiohttp.ClientSession | None = None,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        if type(max_connections) is not int or max_connections < 0:
            raise ValidationError(
                "max_connections", max_connections, "an integer >= 0 (0 means no limit)"
            )
        if session is not None and not isinstance(session, aiohttp.ClientSession):
            raise ValidationError("session", session, "an aiohttp.ClientSession, or None")
        self._max_connections = max_connections
        self._session = session
        self._owns_session = session is None
        # Set on the session we make; `RequestHeaders` built on the very same mapping then
        # send only what they add.
        self._defaults = default_headers if session is None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._default = DEFAULT_TIMEOUT
        self._default_client_timeout = _client_timeout(DEFAULT_TIMEOUT)
        self._timeouts: dict[Timeout, aiohttp.ClientTimeout] = {}

    @property
    def max_connections(self) -> int | None:
        """The pool's size (0: no limit), or None for a caller's session, whose size it is.

        Example::

            AiohttpTransport().max_connections  # 100
        """
        return self._max_connections if self._owns_session else None

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """The aiohttp session in use, or None before the first request.

        Example::

            transport.session.connector.limit
        """
        return self._session

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ClientClosedError("this client is closed; create a new one")
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise EventLoopError(
                "this FluxClient was used in another event loop; create one client per loop"
            )
        self._loop = loop
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, ttl_dns_cache=300, keepalive_timeout=60
        )
        self._session = aiohttp.ClientSession(
            connector=connector, raise_for_status=False, headers=self._defaults
        )
        return self._session

    def _timeout(self, timeout: Timeout) -> aiohttp.ClientTimeout:
        if timeout is self._default:
            return self._default_client_timeout
        client_timeout = self._timeouts.get(timeout)
        if client_timeout is None:
            client_timeout = self._timeouts[timeout] = _client_timeout(timeout)
        return client_timeout

    async def send(self, request: TransportRequest) -> TransportResponse:
        """POST (or any method) with aiohttp and read the answer under the request's cap."""
        session = self._session
        if session is None or self._closed:
            session = self._open()
        failure: BaseException | None = None
        headers: Mapping[str, str] = request.headers
        if type(headers) is RequestHeaders and headers.defaults is self._defaults:
            headers = headers.extra
        try:
            async with session.request(
                request.method,
                request.url,
                data=request.body,
                headers=headers,
                timeout=self._timeout(request.timeout),
            ) as resp:
                status = resp.status
                cap = request.max_response_bytes
                length = resp.content_length
                if length is not None and length <= cap and "Content-Encoding" not in resp.headers:
                    return _answer(status, resp.headers, await resp.read())
                body, truncated = await _read_capped(
                    resp, cap if status < 300 else ERROR_BODY_BYTES, status
                )
                return _answer(status, resp.headers, body, truncated)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            failure = exc
        assert failure is not None
        # Raised here, outside the except block, so the error carries no __context__:
        # aiohttp's exceptions can hold our request headers, Authorization included.
        raise translate_aiohttp_error(failure, url=_safe_url(request.url))

    async def aclose(self) -> None:
        """Close the pool if this transport made it. Safe to call twice.

        Example::

            await transport.aclose()
        """
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<AiohttpTransport max_connections={self.max_connections}{state}>"


def _client_timeout(timeout: Timeout) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=timeout.total, connect=timeout.connect)


def _safe_url(url: str) -> str:
    """The URL without credentials or query string, for messages."""
    try:
        return str(yarl.URL(url).with_user(None).with_query(None))
    except (TypeError, ValueError):
        return "<unparseable url>"


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, status: int) -> tuple[bytes, bool]:
    """Read at most ``cap`` bytes (after decompression): (body, truncated). A 2xx cut
    short is useless, so its body comes back empty; an error keeps its first ``cap``."""
    length = resp.content_length
    if length is not None and length > cap and "Content-Encoding" not in resp.headers:
        return (b"" if status < 300 else await resp.content.read(cap)), True
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap:
            if status < 300:
                return b"", True
            parts.append(chunk[: cap - (size - len(chunk))])
            return b"".join(parts), True
        parts.append(chunk)
    return b"".join(parts), False

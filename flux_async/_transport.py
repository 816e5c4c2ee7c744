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
import base64
import inspect
import json as _json
import logging
import os
import ssl
import urllib.request
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TypeAlias

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

#: The pool's size, as in openai-python (1000): a web app whose handlers share one client
#: never queues for a connection. At 100, 200 concurrent handlers doubled their latency
#: (p50 430 ms at a 200 ms server); an idle connection costs a socket, not a thread.
DEFAULT_MAX_CONNECTIONS = 1000
#: Bytes of one answer read at most, unless the request says otherwise: a real JSON
#: answer with image URLs is a few hundred bytes.
DEFAULT_MAX_RESPONSE_BYTES = 4 * 2**20
#: Bytes of an error body read at most: enough for any message, never a whole page.
ERROR_BODY_BYTES = 64 * 2**10
#: Bytes asked of a plain-HTTP socket per read (asyncio asks 256 KiB). A buffer that
#: large is above glibc's mmap threshold, and in some processes (it depends on what was
#: freed before) every read then maps fresh memory, faults its pages in and unmaps it:
#: ~45 µs a read in a bare loop on this project's machines, ~8 % of a fast fan-out's CPU.
READ_BYTES = 64 * 2**10
_EMPTY: Mapping[str, str] = MappingProxyType({})

logger = logging.getLogger("flux_async")

#: What ``verify=`` takes: True (the system's CA store), False (no verification), the path
#: of a CA bundle (a PEM file, or a directory of hashed certificates), or an SSLContext.
VerifySetting: TypeAlias = bool | str | os.PathLike[str] | ssl.SSLContext
# How one destination is reached: the proxy (None: direct), then the proxy's credentials
# as headers for the CONNECT (https:// targets) or for the request itself (http://).
_Route: TypeAlias = tuple[yarl.URL | None, Mapping[str, str] | None, Mapping[str, str] | None]
_DIRECT: _Route = (None, None, None)
_PROXY_SCHEMES = ("http", "https")


def ssl_setting(verify: object) -> ssl.SSLContext | bool:
    """``verify=`` checked and turned into aiohttp's ``ssl=``: True, False or a context.

    A CA bundle path is loaded now, so a missing or unreadable bundle fails when the
    client is made, not on its first request.

    Example::

        ssl_setting(True)                      # True: the system's CA store
        ssl_setting("/etc/ssl/corp-ca.pem")    # an SSLContext trusting that bundle only
    """
    if isinstance(verify, bool | ssl.SSLContext):
        return verify
    allowed = (
        "True (verify TLS against the system's CA store), False (do not verify), "
        "the path of a CA bundle (PEM file or certificate directory), or an ssl.SSLContext"
    )
    if not isinstance(verify, str | os.PathLike):
        raise ValidationError("verify", verify, allowed)
    path = os.fspath(verify)
    if not isinstance(path, str) or not path:
        raise ValidationError("verify", verify, allowed)
    is_dir = os.path.isdir(path)
    if not is_dir and not os.path.isfile(path):
        raise ValidationError("verify", verify, f"{allowed}; no file or directory is there")
    try:
        if is_dir:
            return ssl.create_default_context(capath=path)
        return ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ValidationError("verify", verify, f"a readable PEM CA bundle ({exc})") from None


def proxy_url(proxy: object) -> yarl.URL | None:
    """``proxy=`` checked: an ``http://`` or ``https://`` proxy URL, or None.

    Credentials in the URL (``http://user:pass@proxy:3128``) are sent to the proxy as
    ``Proxy-Authorization``; they never appear in an error message.

    Example::

        proxy_url("http://proxy.internal:3128")
    """
    if proxy is None:
        return None
    allowed = "an http:// or https:// proxy URL such as 'http://proxy.internal:3128', or None"
    if not isinstance(proxy, str | yarl.URL):
        raise ValidationError("proxy", proxy, allowed)
    try:
        url = yarl.URL(proxy)
    except (TypeError, ValueError):
        raise ValidationError("proxy", _safe_url(str(proxy)), allowed) from None
    if url.scheme not in _PROXY_SCHEMES or not url.host:
        raise ValidationError("proxy", _safe_url(str(proxy)), allowed)
    return url


def environment_proxy(url: str) -> yarl.URL | None:
    """The proxy the environment names for ``url``, or None to go direct.

    ``HTTPS_PROXY`` for https:// URLs, ``HTTP_PROXY`` for http:// ones, else ``ALL_PROXY``
    (upper or lower case, as curl, requests and httpx read them), unless ``NO_PROXY``
    exempts the host. Proxies of another kind (``socks5://``) are skipped with a warning
    logged: aiohttp speaks only to HTTP(S) proxies.

    Example::

        os.environ["HTTPS_PROXY"] = "http://proxy.internal:3128"
        environment_proxy("https://api.example.com/v1/images/generations")
    """
    target = yarl.URL(url)
    proxies = urllib.request.getproxies()
    value = proxies.get(target.scheme) or proxies.get("all")
    if not value or not target.host or urllib.request.proxy_bypass(target.host):
        return None
    if "://" not in value:
        value = "http://" + value  # "proxy:3128", as curl reads it
    try:
        proxy = yarl.URL(value)
    except (TypeError, ValueError):
        proxy = None
    if proxy is None or proxy.scheme not in _PROXY_SCHEMES or not proxy.host:
        logger.warning(
            "ignoring the environment's proxy %s for %s: only http:// and https:// "
            "proxies are supported; going direct",
            _safe_url(value),
            target.host,
        )
        return None
    return proxy


def _route_via(proxy: yarl.URL | None, target: str) -> _Route:
    """The proxy without its credentials, and the ``Proxy-Authorization`` they make: on
    the CONNECT for an https:// ``target``, on the request itself for an http:// one (a
    plain-HTTP request goes to the proxy as it is; aiohttp sends ``proxy_headers`` only
    with a CONNECT)."""
    if proxy is None:
        return _DIRECT
    if proxy.user is None:
        return proxy, None, None
    # Built by hand: aiohttp 3.14 deprecates BasicAuth, and 3.9 lacks its replacement.
    credentials = f"{proxy.user}:{proxy.password or ''}"
    try:
        raw = credentials.encode("latin-1")  # what aiohttp and requests send
    except UnicodeEncodeError:
        raw = credentials.encode("utf-8")  # RFC 7617's charset="UTF-8"
    header = {"Proxy-Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}
    if target.startswith("https:"):
        return proxy.with_user(None), header, None
    return proxy.with_user(None), None, header


class _Connector(aiohttp.TCPConnector):
    """aiohttp's pool, whose plain-HTTP sockets are read `READ_BYTES` at a time."""

    async def connect(self, *args: Any, **kwargs: Any) -> aiohttp.connector.Connection:
        connection = await super().connect(*args, **kwargs)
        transport = connection.transport
        # Only asyncio's socket transports have max_size (undocumented, hence the
        # guard); a TLS connection's socket is read into a buffer its protocol keeps.
        if getattr(transport, "max_size", 0) > READ_BYTES:
            transport.max_size = READ_BYTES  # type: ignore[union-attr]
        return connection


async def _close_with_loop(
    session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop
) -> AsyncGenerator[None, None]:
    """Suspended for the pool's life; closes ``session`` when its event loop shuts down.

    ``asyncio.run`` (and ``asyncio.Runner``, pytest-asyncio, anyio) finalise every async
    generator of a loop before closing it: the one hook asyncio offers for "this loop is
    ending". It lets a module-level client used by successive ``asyncio.run`` calls close
    each loop's pool in that loop, with no "unclosed" warnings, and open a new one in the
    next. Also run when the transport is collected while its loop still runs.
    """
    try:
        yield
    finally:
        # Nothing to await once the session is closed or its loop is gone (see `_retire`).
        if not session.closed and not loop.is_closed():
            await session.close()


def _retire(guard: AsyncGenerator[None, None]) -> None:
    """Finish a `_close_with_loop` guard whose session is closed or whose loop is gone.

    Its ``finally`` then has nothing to await, so ``aclose()`` completes in one step; a
    guard left suspended would, when collected, ask its dead loop to finalise it.
    """
    closer = guard.aclose()
    try:
        closer.send(None)
    except StopIteration:
        return
    closer.close()  # not reached: the guard awaits only an open session in a live loop


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
        """Make one HTTP exchange.

        Example::

            request = TransportRequest(method="GET", url=image_url, headers={})
            response = await transport.send(request)   # any status; no answer: APIConnectionError
        """

    async def aclose(self) -> None:  # noqa: B027 - a transport may hold nothing
        """Release what the transport holds (its pool). Safe to call twice.

        Example::

            await transport.aclose()   # `FluxClient.aclose` calls this for you
        """


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
        """Call the handler (awaiting it if it is async) and cap its body.

        Example::

            transport = MockTransport(lambda request: TransportResponse(204))
            request = TransportRequest(method="GET", url="http://test", headers={})
            assert (await transport.send(request)).status == 204
        """
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

    Event loops: the pool belongs to the loop it was made in. When that loop shuts down
    through ``asyncio.run`` (or ``asyncio.Runner``, pytest-asyncio, anyio) the pool is
    closed with it, and the next request, in a new loop, makes a new one: a module-level
    client serves successive ``asyncio.run`` calls. Use from a second loop while the first
    is still open raises `EventLoopError`. A loop closed bare (``loop.close()`` without
    ``loop.shutdown_asyncgens()``) takes its sockets with it: the next loop still gets a
    new pool, but the old one is left to the garbage collector, which may warn about it.

    Network settings (for the pool it makes; with ``session=`` they are the session's):

    * ``trust_env`` (True): proxies from ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY``,
      honouring ``NO_PROXY``, read when the pool is made (as httpx reads them when its
      client is). Not ``.netrc``: the API key is the one credential sent.
    * ``proxy``: an ``http://`` or ``https://`` proxy for every request (credentials in
      the URL go to the proxy only); it wins over the environment.
    * ``verify`` (True): TLS certificates checked against the system's CA store; False
      turns checking off; a path uses that CA bundle instead (a corporate proxy's root);
      an ``ssl.SSLContext`` is used as it is.

    Example::

        transport = AiohttpTransport(max_connections=256)
        client = FluxClient(transport=transport)

        corporate = AiohttpTransport(proxy="http://proxy.internal:3128",
                                     verify="/etc/ssl/corp-root.pem")
    """

    def __init__(
        self,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        session: aiohttp.ClientSession | None = None,
        default_headers: Mapping[str, str] | None = None,
        trust_env: bool = True,
        proxy: str | None = None,
        verify: VerifySetting = True,
    ) -> None:
        if type(max_connections) is not int or max_connections < 0:
            raise ValidationError(
                "max_connections", max_connections, "an integer >= 0 (0 means no limit)"
            )
        if session is not None and not isinstance(session, aiohttp.ClientSession):
            raise ValidationError("session", session, "an aiohttp.ClientSession, or None")
        if type(trust_env) is not bool:
            raise ValidationError("trust_env", trust_env, "True or False")
        self._proxy = proxy_url(proxy)
        self._ssl = ssl_setting(verify)
        if session is not None:
            # A caller's session has its own proxy and TLS settings: two places to set one
            # thing would leave one of them silently ignored.
            for name, value, default in (
                ("trust_env", trust_env, True),
                ("proxy", proxy, None),
                ("verify", verify, True),
            ):
                if value is not default:
                    raise ValidationError(
                        name,
                        value,
                        f"the default ({default}) when session= is given: set proxies and "
                        "TLS on your aiohttp.ClientSession (trust_env=, proxy=) and its "
                        "TCPConnector (ssl=)",
                    )
        self._trust_env = trust_env
        # Per destination URL, resolved once per pool (the client sends to one URL).
        self._routes: dict[str, _Route] = {}
        # Suspended while the pool lives; closes it when its loop shuts down.
        self._guard: AsyncGenerator[None, None] | None = None
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
        # (the pool's session, a session over its connector without default headers)
        self._bare: tuple[aiohttp.ClientSession, aiohttp.ClientSession] | None = None

    @property
    def max_connections(self) -> int | None:
        """The pool's size (0: no limit), or None for a caller's session, whose size it is.

        Example::

            AiohttpTransport().max_connections  # 1000
        """
        return self._max_connections if self._owns_session else None

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """The aiohttp session in use, or None before the first request.

        Example::

            transport.session.connector.limit
        """
        return self._session

    async def _open(self, loop: asyncio.AbstractEventLoop) -> aiohttp.ClientSession:
        """The pool for ``loop``: bound at first use, made anew once its old loop is gone."""
        if self._closed:
            raise ClientClosedError("this client is closed; create a new one")
        bound = self._loop
        if bound is not None and bound is not loop:
            if not self._owns_session:
                raise EventLoopError(
                    "the aiohttp session given to this client belongs to another event "
                    "loop; give it a session made in the loop that uses it"
                )
            if not bound.is_closed():
                raise EventLoopError(
                    "this client's connection pool belongs to another event loop, which is "
                    "still open: use one client per event loop (or per thread running "
                    "one), or close the other loop first (asyncio.run closes its loop)"
                )
            self._abandon_pool()
        self._loop = loop
        if self._session is not None:
            return self._session  # a caller's session, bound to this loop now
        connector = _Connector(
            limit=self._max_connections, ttl_dns_cache=300, keepalive_timeout=60, ssl=self._ssl
        )
        session = self._session = aiohttp.ClientSession(
            connector=connector, raise_for_status=False, headers=self._defaults
        )
        # The environment is read again for each pool, as httpx reads it per client.
        self._routes = {}
        guard = self._guard = _close_with_loop(session, loop)
        # Started now, in the loop: the loop finalises it (closing the pool) at shutdown.
        await guard.__anext__()
        return session

    def _abandon_pool(self) -> None:
        """Forget a pool whose event loop has closed: its sockets cannot be closed now.

        Usually the loop's shutdown closed it already (`_close_with_loop`); this is the
        loop closed bare, without finalising its async generators.
        """
        session, self._session = self._session, None
        guard, self._guard = self._guard, None
        if guard is not None:
            _retire(guard)
        if session is not None and not session.closed:
            logger.warning(
                "the event loop of this client's connection pool closed without "
                "finalising it (use asyncio.run, or loop.shutdown_asyncgens() before "
                "loop.close()); a new pool is made and the old one is left unclosed"
            )

    def _route(self, url: str) -> _Route:
        """How to reach ``url``: direct, the ``proxy=`` given, or the environment's proxy."""
        # The route depends only on the scheme and host, so it is cached per origin: image
        # downloads go to a new URL each, and the environment is read once per origin.
        end = url.find("/", url.find("//") + 2)
        origin = url if end < 0 else url[:end]
        route = self._routes.get(origin)
        if route is None:
            if self._proxy is not None:
                route = _route_via(self._proxy, url)
            elif self._trust_env:
                route = _route_via(environment_proxy(url), url)
            else:
                route = _DIRECT
            if len(self._routes) < 64:  # a CDN may shard over many hosts: stay small
                self._routes[origin] = route
        return route

    def _timeout(self, timeout: Timeout) -> aiohttp.ClientTimeout:
        if timeout is self._default:
            return self._default_client_timeout
        client_timeout = self._timeouts.get(timeout)
        if client_timeout is None:
            client_timeout = self._timeouts[timeout] = _client_timeout(timeout)
        return client_timeout

    async def send(self, request: TransportRequest) -> TransportResponse:
        """POST (or any method) with aiohttp and read the answer under the request's cap.

        Example::

            request = TransportRequest(method="GET", url=image_url, headers={})
            response = await transport.send(request)   # response.truncated: a 2xx over 4 MiB
        """
        session = self._session
        # Checked on every request, not only when the pool is made: a pool whose loop has
        # closed must be replaced, and another live loop must not touch it.
        loop = asyncio.get_running_loop()
        if session is None or loop is not self._loop:
            session = await self._open(loop)
        proxy, proxy_headers, proxy_auth = self._route(request.url)
        failure: BaseException | None = None
        headers: Mapping[str, str] = request.headers
        if type(headers) is RequestHeaders and headers.defaults is self._defaults:
            headers = headers.extra
        elif self._defaults and self._owns_session:
            # Headers not built on the session's defaults (an image download from another
            # origin): the session would add its defaults, Authorization included. A
            # session without defaults over the same connector sends only these.
            session = self._bare_session(session)
        if proxy_auth is not None:
            headers = {**headers, **proxy_auth}
        try:
            async with session.request(
                request.method,
                request.url,
                # None for a bodiless GET: b"" would add Content-Length and Content-Type.
                data=request.body or None,
                headers=headers,
                timeout=self._timeout(request.timeout),
                proxy=proxy,
                proxy_headers=proxy_headers,
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

    def _bare_session(self, session: aiohttp.ClientSession) -> aiohttp.ClientSession:
        """A session without default headers sharing ``session``'s pool (made once per pool)."""
        bare = self._bare
        if bare is None or bare[0] is not session:
            if bare is not None:
                bare[1].detach()  # the pool it shared was replaced; never closes a connector
            plain = aiohttp.ClientSession(
                connector=session.connector,
                connector_owner=False,
                raise_for_status=False,
                trust_env=session.trust_env,
            )
            bare = self._bare = (session, plain)
        return bare[1]

    async def aclose(self) -> None:
        """Close the pool if this transport made it. Safe to call twice.

        Example::

            await transport.aclose()
        """
        loop = self._loop
        session = self._session
        live = session is not None and self._owns_session and not session.closed
        if (
            live
            and loop is not None
            and not loop.is_closed()
            and loop is not asyncio.get_running_loop()
        ):
            raise EventLoopError(
                "close this client in the event loop that uses it: its connection "
                "pool belongs to another loop, which is still open"
            )
        bare = self._bare
        if bare is not None:
            self._bare = None
            # Not the pool's owner: detaching leaves the connector to the main session.
            bare[1].detach()
        self._closed = True
        self._session = None
        guard, self._guard = self._guard, None
        if live and session is not None:
            if loop is None or loop.is_closed():
                # Closed bare (see `_abandon_pool`): its sockets went with the loop.
                logger.warning("the event loop of this client's pool closed without closing it")
            else:
                await session.close()
        if guard is not None:
            _retire(guard)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<AiohttpTransport max_connections={self.max_connections}{state}>"


def _client_timeout(timeout: Timeout) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=timeout.total, connect=timeout.connect, sock_read=timeout.read
    )


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

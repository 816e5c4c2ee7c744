"""`FluxClient`'s constructor arguments: each checked before anything else happens, then
resolved (environment, defaults, headers, transport) into one frozen `ClientSettings`.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import attrs
import yarl

from ._attempt import CallContext
from ._config import Timeout, check_timeout
from ._exceptions import APIError, ValidationError
from ._limits import Limiter, RateLimiter
from ._loop_binding import LoopBinding
from ._models import ImageRequest
from ._outage import OutageGuard
from ._retry import RetryBudget, RetryPolicy
from ._save import Downloader
from ._transport import AiohttpTransport, AsyncTransport, VerifySetting
from ._version import __version__

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "ClientSettings",
    "Secret",
    "check_idempotency_key",
    "client_settings",
]

ENV_API_KEY = "FLUX_API_KEY"
ENV_BASE_URL = "FLUX_BASE_URL"
#: The contract's server, with the ``/v1`` that OpenAI-style base URLs end in.
DEFAULT_BASE_URL = "https://api.chainhub.tech/v1"

_USER_AGENT = f"flux-async/{__version__} python/{sys.version_info[0]}.{sys.version_info[1]}"
_ENDPOINT = "images/generations"

# The pool's network settings and their defaults (see AiohttpTransport).
_NETWORK_DEFAULTS: dict[str, object] = {"trust_env": True, "proxy": None, "verify": True}


class Secret:
    """Holds the API key so that no repr, log line or traceback local shows it.

    Example::

        key = Secret("sk-...")
        repr(key)  # '<redacted>'
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


# No equality: the settings hold live objects (the pool, the limiter).
@attrs.frozen(kw_only=True, eq=False)
class ClientSettings:
    """What a `FluxClient` was made with, checked and resolved (made by `client_settings`).

    ``url`` is the endpoint calls go to, ``safe_url`` the same without credentials or
    query (what logs and errors show); ``headers`` are the ones every request carries.
    The client's public attributes (``model``, ``retry`` ...) start from these values.

    Example::

        settings = client_settings(api_key=None, base_url="http://127.0.0.1:8000/v1", ...)
        settings.safe_url  # 'http://127.0.0.1:8000/v1/images/generations'
    """

    base_url: yarl.URL = attrs.field(repr=False)
    url: yarl.URL = attrs.field(repr=False)
    api_key: Secret | None
    model: str
    retry: RetryPolicy
    retry_budget: RetryBudget
    limiter: Limiter
    outage: OutageGuard
    timeout: Timeout
    headers: Mapping[str, str] = attrs.field(repr=False)
    transport: AsyncTransport
    max_response_bytes: int | None
    max_image_bytes: int
    safe_url: str = attrs.field(init=False)

    @safe_url.default
    def _without_credentials(self) -> str:
        return str(self.url.with_user(None).with_query(None))

    def downloader(
        self, policy: RetryPolicy, timeout: Timeout, is_closed: Callable[[], bool]
    ) -> Downloader:
        """The `Downloader` of a client with these settings and its current ``policy``
        and ``timeout``: the API key goes only to ``base_url``'s own origin.

        Example::

            downloader = settings.downloader(client.retry, client.timeout, lambda: False)
        """
        return Downloader(
            transport=self.transport,
            policy=policy,
            api_origin=str(self.base_url.origin()),
            api_headers=self.headers,
            timeout=timeout,  # with a read limit the Downloader adds if it has none
            max_bytes=self.max_image_bytes,
            is_closed=is_closed,
        )

    def call_context(
        self,
        is_closed: Callable[[], bool],
        status_error: Callable[[int, bytes, Mapping[str, str], str | None], APIError],
    ) -> CallContext:
        """Everything a call needs from the client, in one frozen object (made once).

        Example::

            context = settings.call_context(lambda: False, status_error)
        """
        prefix = f"flux-async-{os.urandom(8).hex()}-"
        keys = itertools.count(1)

        def new_key() -> str:
            # A random per-client prefix and a counter: unique across processes like a
            # UUID, at a tenth of the cost on a path a batch runs a million times.
            return f"{prefix}{next(keys)}"

        return CallContext(
            label=f"POST {self.safe_url}",
            url=str(self.url),
            transport=self.transport,
            headers=self.headers,
            is_closed=is_closed,
            new_key=new_key,
            limiter=self.limiter,
            budget=self.retry_budget,
            outage=self.outage,
            status_error=status_error,
            max_response_bytes=self.max_response_bytes,
            check_loop=LoopBinding().check,
        )


def client_settings(
    *,
    api_key: str | None,
    base_url: str | None,
    model: str,
    retry: RetryPolicy | None,
    retry_budget: RetryBudget | None,
    limiter: Limiter | None,
    timeout: Timeout,
    max_connections: int,
    session: aiohttp.ClientSession | None,
    transport: AsyncTransport | None,
    default_headers: Mapping[str, str] | None,
    outage: OutageGuard | None,
    max_response_bytes: int | None,
    max_image_bytes: int,
    trust_env: bool,
    proxy: str | None,
    verify: VerifySetting,
) -> ClientSettings:
    """Check `FluxClient`'s arguments (a `ValidationError` naming the first bad one) and
    resolve them: the environment's key and base URL, defaults, headers, the transport.

    Example::

        settings = client_settings(api_key="sk-...", base_url=None, model=DEFAULT_MODEL, ...)
    """
    key = _api_key(api_key)
    url = _check_base_url(base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL)
    _check_settings(timeout, retry, retry_budget, limiter, outage, max_response_bytes)
    if type(max_image_bytes) is not int or max_image_bytes < 1024:
        raise ValidationError("max_image_bytes", max_image_bytes, "an integer >= 1024")
    _check_default_headers(default_headers)
    # Validate the default model the same way a request would, before any I/O.
    ImageRequest(prompt="x", model=model)
    if (key is not None or url.user) and url.scheme == "http":
        _warn_if_not_loopback(url)
    secret = Secret(key) if key is not None else None
    headers = _headers(default_headers, secret)
    network = {"trust_env": trust_env, "proxy": proxy, "verify": verify}
    return ClientSettings(
        base_url=url,
        url=url.joinpath(_ENDPOINT) if url.path != "/" else url.with_path("/" + _ENDPOINT),
        api_key=secret,
        model=model,
        retry=retry if retry is not None else RetryPolicy(),
        retry_budget=retry_budget if retry_budget is not None else RetryBudget(),
        limiter=limiter if limiter is not None else RateLimiter(),
        outage=outage if outage is not None else OutageGuard(),
        timeout=timeout,
        headers=headers,
        transport=_transport(transport, session, max_connections, headers, network),
        max_response_bytes=max_response_bytes,
        max_image_bytes=max_image_bytes,
    )


def header_safe(text: str) -> bool:
    """True when ``text`` can go in a header: no CR, LF or NUL.

    Example::

        header_safe("sk-1\\n")  # False
    """
    # A CR or LF would end the header line (aiohttp refuses it at send time, per prompt).
    return "\r" not in text and "\n" not in text and "\x00" not in text


def check_idempotency_key(value: object) -> None:
    """`ValidationError` unless ``value`` is None or a key that can go in a header.

    Example::

        check_idempotency_key("order-42")
    """
    if value is not None and (
        not isinstance(value, str) or not value.strip() or not header_safe(value)
    ):
        raise ValidationError("idempotency_key", value, "a non-empty string without line breaks")


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


def _check_default_headers(headers: object) -> None:
    if headers is None:
        return
    if not isinstance(headers, Mapping):
        raise ValidationError("default_headers", headers, "a mapping of header names to values")
    for name, value in headers.items():
        if not isinstance(name, str) or not name.strip() or not header_safe(name):
            raise ValidationError("default_headers", name, "header names: non-empty strings")
        if not isinstance(value, str) or not header_safe(value):
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
    if api_key != api_key.strip() or not header_safe(api_key):
        # Typically a key read from a file with its newline: it would fail every call.
        raise ValidationError(
            "api_key",
            "<redacted>",
            "a key without surrounding whitespace or line breaks (strip the key you read)",
        )
    return api_key


def _check_settings(
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
            # Past client_settings and FluxClient.__init__: the caller's line.
            stacklevel=4,
        )


def _headers(default_headers: Mapping[str, str] | None, key: Secret | None) -> dict[str, str]:
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

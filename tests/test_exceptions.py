"""The error tree and the one place aiohttp errors are translated."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

import flux_async
from flux_async import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from flux_async._exceptions import _aiohttp_error_class, error_for_status, translate_aiohttp_error


def _subclasses(cls: type[BaseException]) -> set[type[BaseException]]:
    found = set()
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= _subclasses(sub)
    return found


def test_every_aiohttp_client_error_maps_to_ours() -> None:
    """Every aiohttp.ClientError subclass is an APIConnectionError; timeouts APITimeoutError."""
    classes = _subclasses(aiohttp.ClientError) | {aiohttp.ClientError}
    assert len(classes) > 20
    for cls in classes:
        ours = _aiohttp_error_class(cls)
        assert issubclass(ours, APIConnectionError), cls
        is_timeout = issubclass(cls, asyncio.TimeoutError)
        assert (ours is APITimeoutError) == is_timeout, cls


def test_timeouts_translate_to_timeout_error() -> None:
    """asyncio/aiohttp timeouts become APITimeoutError, which is an APIConnectionError."""
    for exc in (TimeoutError(), aiohttp.ServerTimeoutError("slow")):
        ours = translate_aiohttp_error(exc, url="http://x/v1/images/generations", attempts=2)
        assert type(ours) is APITimeoutError
        assert ours.attempts == 2


def test_response_error_does_not_leak_headers() -> None:
    """A ClientResponseError's message (which may hold our headers) is not copied into ours."""
    info = aiohttp.RequestInfo(
        url=__import__("yarl").URL("http://x"),
        method="POST",
        headers=__import__("multidict").CIMultiDictProxy(
            __import__("multidict").CIMultiDict({"Authorization": "Bearer sk-secret"})
        ),
    )
    exc = aiohttp.ClientResponseError(info, (), status=500, message="boom")
    ours = translate_aiohttp_error(exc, url="http://x")
    assert "sk-secret" not in str(ours)
    assert "500" in str(ours)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, InternalServerError),
        (502, InternalServerError),
        (599, InternalServerError),
        (418, APIStatusError),
    ],
)
def test_status_maps_to_class(status: int, cls: type[APIStatusError]) -> None:
    """Each error status becomes its own class, carrying status, body and request id."""
    body = {"error": {"message": "nope", "type": "t", "code": "c"}}
    exc = error_for_status(status, body, request_id="req_9")
    assert type(exc) is cls
    assert exc.status_code == status
    assert exc.body == body
    assert exc.request_id == "req_9"
    assert str(exc) == f"Error code: {status} - nope"


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (
            {
                "error": {
                    "message": "no",
                    "type": "invalid_request_error",
                    "code": "content_policy_violation",
                    "param": "prompt",
                }
            },
            ("content_policy_violation", "invalid_request_error", "prompt"),
        ),
        ({"error": {"message": "no", "code": 1234}}, ("1234", None, None)),
        ({"message": "flat", "code": "quota", "type": "billing"}, ("quota", "billing", None)),
        ({"error": "a string, not an object"}, (None, None, None)),
        ("<html>proxy</html>", (None, None, None)),
        (None, (None, None, None)),
    ],
)  # fmt: skip
def test_the_providers_code_type_and_param_are_read_from_the_body(
    body: object, fields: tuple[str | None, str | None, str | None]
) -> None:
    """As openai's errors have them: ``code``, ``type`` and ``param`` of the body's
    ``error`` object (or of a flat body), None where the body has none."""
    exc = error_for_status(400, body)
    assert (exc.code, exc.type, exc.param) == fields


def test_html_body_gives_a_useful_message() -> None:
    """A proxy's HTML error page yields its title, not a wall of markup."""
    page = "<html><head><title>502 Bad Gateway</title></head><body><h1>x</h1></body></html>"
    exc = error_for_status(502, page)
    assert str(exc) == "Error code: 502 - 502 Bad Gateway"
    assert exc.body == page


def test_rate_limit_error_carries_retry_after() -> None:
    """RateLimitError keeps the server's Retry-After in seconds."""
    exc = error_for_status(429, {"error": {"message": "slow down"}}, retry_after=2.5)
    assert isinstance(exc, RateLimitError)
    assert exc.retry_after == 2.5


def test_tree_has_one_root() -> None:
    """Every public exception derives from FluxError; ValidationError is also a ValueError."""
    for name in flux_async.__all__:
        obj = getattr(flux_async, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, flux_async.FluxError), name
    assert issubclass(flux_async.ValidationError, ValueError)
    assert issubclass(flux_async.ClientClosedError, RuntimeError)


FAKE_KEY = "sk-fake-5f4dcc3b5aa765d61d8327deb882cf99"
_URL = f"https://user:{FAKE_KEY}@api.example/v1/images/generations?api_key={FAKE_KEY}"


def _leaky(cls: type[BaseException]) -> BaseException:
    """An instance of ``cls`` carrying the fake key everywhere aiohttp could put it."""
    from aiohttp.client_reqrep import ConnectionKey
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    headers = CIMultiDictProxy(
        CIMultiDict({"Authorization": f"Bearer {FAKE_KEY}", "X-Api-Key": FAKE_KEY})
    )
    text = f"failed: headers={dict(headers)!r} url={_URL}"
    if issubclass(cls, aiohttp.ClientResponseError):
        info = aiohttp.RequestInfo(URL(_URL), "POST", headers, URL(_URL))
        return cls(info, (), status=500, message=text, headers=headers)
    if issubclass(cls, aiohttp.ClientConnectorError):
        key = ConnectionKey(
            host="api.example",
            port=443,
            is_ssl=True,
            ssl=True,
            proxy=URL(f"http://proxy-user:{FAKE_KEY}@proxy:3128"),
            proxy_auth=None,
            proxy_headers_hash=hash(FAKE_KEY),
        )
        error = OSError(111, "Connection refused")
        if cls.__name__ == "UnixClientConnectorError":
            return cls("/tmp/socket", key, error)  # type: ignore[call-arg]
        return cls(key, error)
    if issubclass(cls, aiohttp.InvalidURL):
        return cls(URL(_URL), text)
    if issubclass(cls, aiohttp.ServerFingerprintMismatch):
        return cls(b"\x00" * 32, b"\x01" * 32, "api.example", 443)
    if issubclass(cls, aiohttp.ServerDisconnectedError):
        return cls(text)
    return cls(text)


def test_no_aiohttp_error_leaks_a_key_into_ours() -> None:
    """Walk every aiohttp.ClientError subclass: our error never shows header values."""
    classes = _subclasses(aiohttp.ClientError) | {aiohttp.ClientError}
    for cls in sorted(classes, key=lambda c: c.__name__):
        original = _leaky(cls)
        assert type(original) is cls
        ours = translate_aiohttp_error(original, url="https://api.example/v1/images/generations")
        shown = str(ours) + repr(ours) + ours.message + "".join(getattr(ours, "__notes__", []))
        assert FAKE_KEY not in shown, cls
        assert cls.__name__ in str(ours), cls
        assert "https://api.example/v1/images/generations" in str(ours), cls
        assert ours.__cause__ is None
        assert ours.__context__ is None


def test_disconnect_with_a_half_read_response_is_short() -> None:
    """ServerDisconnectedError carrying a parsed response is described, not dumped."""

    class HalfRead:
        """Stands in for aiohttp's RawResponseMessage (its signature varies by version)."""

        def __repr__(self) -> str:
            return f"RawResponseMessage(headers={{'Set-Cookie': 'session={FAKE_KEY}'}})"

    exc = aiohttp.ServerDisconnectedError(HalfRead())  # type: ignore[arg-type]
    ours = translate_aiohttp_error(exc, url="https://x")
    assert FAKE_KEY not in str(ours)
    assert "mid-response" in str(ours)


def test_connection_error_message_is_complete() -> None:
    """The message alone says where, what kind and what happened: it can be raised from None."""
    ours = translate_aiohttp_error(
        aiohttp.ClientOSError(104, "Connection reset by peer"), url="https://x/v1", attempts=3
    )
    assert str(ours) == (
        "Connection error talking to https://x/v1: ClientOSError: [Errno 104] "
        "Connection reset by peer"
    )
    assert ours.attempts == 3
    timeout = translate_aiohttp_error(aiohttp.ConnectionTimeoutError("slow"), url="https://x")
    assert str(timeout) == "Request to https://x timed out (ConnectionTimeoutError: slow)"


def test_validation_error_repr_is_short_and_safe() -> None:
    """ValidationError shows a short repr of any value, however deep or broken."""

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    for value in (deep, Broken(), "x" * 10_000_000):
        exc = flux_async.ValidationError("field", value, "something else")
        assert len(str(exc)) < 150
        assert str(exc).startswith("field=")

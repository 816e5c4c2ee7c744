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

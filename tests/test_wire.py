"""Wire-level unit cases with aioresponses: exactly what goes out, and odd answers."""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from yarl import URL

from flux_async import (
    APIConnectionError,
    FluxClient,
    InternalServerError,
    RateLimitError,
    RetryPolicy,
)

BASE = "https://gateway.example/v1"
ENDPOINT = f"{BASE}/images/generations"
OK = {"created": 1, "data": [{"url": "https://cdn.example/1.png"}]}


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required ``stream_writer`` argument."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", types.SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class _Wire(aioresponses):
    def post(self, url: str, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("response_class", _Response)
        super().post(url, **kwargs)


@pytest.fixture
def wire() -> Iterator[aioresponses]:
    """aioresponses intercepting every aiohttp request of the test."""
    with _Wire() as mocked:
        yield mocked


async def test_what_goes_out(wire: aioresponses) -> None:
    """POST to <base_url>/images/generations with a compact JSON body and an idempotency key."""
    wire.post(ENDPOINT, payload=OK, headers={"x-request-id": "req_1"})
    async with FluxClient(api_key="sk-x", base_url=BASE) as client:
        response = await client.generate("a fox", aspect_ratio="16:9", extra_body={"seed": 4})
    assert response.request_id == "req_1"
    ((method, url), calls) = next(iter(wire.requests.items()))
    assert (method, url) == ("POST", URL(ENDPOINT))
    sent = calls[0].kwargs
    assert json.loads(sent["data"]) == {
        "prompt": "a fox",
        "model": "flux-kontext-pro",
        "n": 1,
        "aspect_ratio": "16:9",
        "seed": 4,
    }
    assert sent["headers"]["Idempotency-Key"].startswith("flux-async-")


async def test_caller_session_gets_every_header(wire: aioresponses) -> None:
    """With the caller's own session, auth, type and agent headers go on each request."""
    wire.post(ENDPOINT, payload=OK)
    async with aiohttp.ClientSession() as session:
        client = FluxClient(api_key="sk-x", base_url=BASE, session=session)
        await client.generate("x", idempotency_key="job-7")
        await client.aclose()
        assert not session.closed
    headers = next(iter(wire.requests.values()))[0].kwargs["headers"]
    assert headers["Authorization"] == "Bearer sk-x"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("flux-async/")
    assert headers["Idempotency-Key"] == "job-7"


async def test_retry_after_ms_is_preferred(wire: aioresponses) -> None:
    """A 429 carrying retry-after-ms and Retry-After exposes the precise one."""
    wire.post(
        ENDPOINT,
        status=429,
        payload={"error": {"message": "slow down", "type": "requests"}},
        headers={"retry-after-ms": "1500", "Retry-After": "2"},
    )
    async with FluxClient(base_url=BASE, retry=RetryPolicy.never()) as client:
        with pytest.raises(RateLimitError) as info:
            await client.generate("x")
    assert info.value.retry_after == 1.5
    assert str(info.value) == "Error code: 429 - slow down"


async def test_connection_error_is_retried_then_raised(wire: aioresponses) -> None:
    """aiohttp connection errors become APIConnectionError and are retried per the policy."""
    for _ in range(3):
        wire.post(ENDPOINT, exception=aiohttp.ClientConnectionError("reset by peer"))
    async with FluxClient(base_url=BASE, retry=RetryPolicy.for_tests(max_attempts=3)) as client:
        with pytest.raises(APIConnectionError, match="reset by peer") as info:
            await client.generate("x")
    assert info.value.attempts == 3


async def test_text_error_body_is_kept(wire: aioresponses) -> None:
    """A plain-text 503 from a proxy still gives a readable message and keeps the body."""
    wire.post(ENDPOINT, status=503, body="upstream connect error", content_type="text/plain")
    async with FluxClient(base_url=BASE, retry=RetryPolicy.never()) as client:
        with pytest.raises(InternalServerError) as info:
            await client.generate("x")
    assert info.value.body == "upstream connect error"
    assert "upstream connect error" in str(info.value)

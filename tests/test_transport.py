"""The transport seam: MockTransport for users' tests, AiohttpTransport at the boundary."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import pytest

from flux_async import (
    AiohttpTransport,
    APIConnectionError,
    APIResponseValidationError,
    AsyncTransport,
    ClientClosedError,
    FluxClient,
    InternalServerError,
    MockTransport,
    RateLimitError,
    RetryPolicy,
    TransportRequest,
    TransportResponse,
    ValidationError,
    _transport,
)
from flux_async._transport import READ_BYTES, RequestHeaders
from flux_async.emulator import Emulator

from .conftest import serving

OK = {"created": 1, "data": [{"url": "https://img.example/1.png"}]}


def test_transport_response_builds_json_or_bytes_and_checks_them() -> None:
    """json= is encoded with a content type; bad statuses and bodies are refused."""
    response = TransportResponse(200, json=OK)
    assert json.loads(response.body) == OK
    assert response.headers["Content-Type"] == "application/json"
    assert TransportResponse(503, body=b"busy").body == b"busy"
    with pytest.raises(ValidationError, match="status"):
        TransportResponse(42)
    with pytest.raises(ValidationError, match="body"):
        TransportResponse(200, json=OK, body=b"x")


def test_transport_request_repr_hides_headers() -> None:
    """A request's repr names method, URL (no credentials or query) and size; no headers."""
    request = TransportRequest(
        method="POST",
        url="https://user:pw@api.example/v1/images/generations?key=sk-secret",
        headers={"Authorization": "Bearer sk-secret"},
        body=b'{"prompt":"x"}',
    )
    shown = repr(request)
    assert "sk-secret" not in shown
    assert "pw" not in shown
    assert shown == "<TransportRequest POST https://api.example/v1/images/generations 14 bytes>"
    assert request.json() == {"prompt": "x"}


async def test_mock_transport_sees_every_header_and_the_body() -> None:
    """A sync handler gets the request as sent: URL, auth, idempotency key, JSON body."""
    seen: list[TransportRequest] = []

    def handler(request: TransportRequest) -> TransportResponse:
        seen.append(request)
        return TransportResponse(200, json=OK, headers={"x-request-id": "req-1"})

    async with FluxClient(
        api_key="sk-test", base_url="https://gw.example/v1", transport=MockTransport(handler)
    ) as client:
        response = await client.generate("a fox", aspect_ratio="16:9")
    assert response.urls == ["https://img.example/1.png"]
    assert response.request_id == "req-1"
    (request,) = seen
    assert (request.method, request.url) == ("POST", "https://gw.example/v1/images/generations")
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.headers["Idempotency-Key"].startswith("flux-async-")
    assert request.json() == {
        "prompt": "a fox",
        "model": "flux-kontext-pro",
        "n": 1,
        "aspect_ratio": "16:9",
    }


async def test_mock_transport_drives_retries_and_errors() -> None:
    """An async handler plays 503, a dropped connection, then 200: the policy retries both;
    a 429 with a day-long Retry-After ends the call; the key is the same on every attempt."""
    script: Iterator[TransportResponse | Exception] = iter(
        [
            TransportResponse(503, body=b"<html>busy</html>"),
            APIConnectionError("connection reset"),
            TransportResponse(200, json=OK),
            TransportResponse(429, headers={"Retry-After": "86400"}),
        ]
    )
    keys: list[str] = []

    async def handler(request: TransportRequest) -> TransportResponse:
        keys.append(request.headers["Idempotency-Key"])
        step = next(script)
        if isinstance(step, Exception):
            raise step
        return step

    async with FluxClient(
        transport=MockTransport(handler), retry=RetryPolicy.for_tests()
    ) as client:
        response = await client.generate("a fox")
        with pytest.raises(RateLimitError) as info:
            await client.generate("a crow")
    assert response.urls
    assert len(set(keys[:3])) == 1
    assert keys[3] != keys[0]
    assert info.value.retry_after == 86400
    assert info.value.attempts == 1


async def test_mock_transport_fan_out_with_no_sockets() -> None:
    """A whole batch runs on a handler; a failing prompt is a result, not an exception."""

    def handler(request: TransportRequest) -> TransportResponse:
        if request.json()["prompt"] == "poison":
            return TransportResponse(500, json={"error": {"message": "model crashed"}})
        return TransportResponse(200, json=OK)

    async with FluxClient(
        transport=MockTransport(handler), retry=RetryPolicy.for_tests()
    ) as client:
        results = await client.gather_generate(["a", "poison", "b"])
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, InternalServerError)
    assert results[1].attempts == 4


async def test_mock_transport_caps_bodies_like_the_real_one() -> None:
    """A 2xx body over max_response_bytes comes back truncated: a typed error, not read."""
    big = b'{"created": 1, "data": [{"url": "' + b"x" * 5000 + b'"}]}'

    def handler(request: TransportRequest) -> TransportResponse:
        return TransportResponse(200, body=big)

    async with FluxClient(transport=MockTransport(handler), max_response_bytes=1024) as client:
        with pytest.raises(APIResponseValidationError, match="over 1024 bytes"):
            await client.generate("x")


async def test_handler_returning_the_wrong_type_is_a_clear_error() -> None:
    """A handler bug surfaces as a TypeError naming what it returned."""
    async with FluxClient(transport=MockTransport(lambda r: {"status": 200})) as client:  # type: ignore[arg-type,return-value]
        with pytest.raises(TypeError, match="returned dict, not a TransportResponse"):
            await client.generate("x")


async def test_client_closes_its_transport_and_refuses_after() -> None:
    """aclose() closes the transport; a call after it is a ClientClosedError."""
    closed: list[bool] = []

    class Recording(AsyncTransport):
        async def send(self, request: TransportRequest) -> TransportResponse:
            return TransportResponse(200, json=OK)

        async def aclose(self) -> None:
            closed.append(True)

    client = FluxClient(transport=Recording())
    await client.generate("x")
    await client.aclose()
    assert closed == [True]
    with pytest.raises(ClientClosedError):
        await client.generate("x")


def test_transport_and_session_are_exclusive() -> None:
    """Passing both a transport and a session is refused, naming session."""

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(ValidationError, match="session"):
                FluxClient(
                    transport=MockTransport(lambda r: TransportResponse(200)), session=session
                )

    asyncio.get_event_loop().run_until_complete(main())


async def test_aiohttp_transport_sends_only_what_the_call_adds() -> None:
    """Over its own pool the constant headers live on the session; each request still
    carries them all on the wire (the emulator sees them)."""
    async with Emulator(api_keys=["sk-a"]) as emu:
        async with FluxClient(api_key="sk-a", base_url=emu.base_url) as client:
            await client.generate("x")
            transport = client.transport
            assert isinstance(transport, AiohttpTransport)
            assert transport.session is not None
            assert transport.session.headers["Authorization"] == "Bearer sk-a"
        (seen,) = emu.requests  # the emulator checks the key: a 2xx means it came
        assert seen.status == 200
        assert seen.idempotency_key is not None
        assert seen.idempotency_key.startswith("flux-async-")


async def test_aiohttp_errors_become_ours_without_context() -> None:
    """A refused connection is an APIConnectionError with no aiohttp exception attached."""
    transport = AiohttpTransport()
    request = TransportRequest(
        method="POST",
        url="http://127.0.0.1:9/v1/images/generations",
        headers=RequestHeaders({"Authorization": "Bearer sk-secret"}, {}),
    )
    try:
        with pytest.raises(APIConnectionError) as info:
            await transport.send(request)
    finally:
        await transport.aclose()
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert "sk-secret" not in str(info.value)
    assert "sk-secret" not in repr(info.value)


async def test_plain_http_sockets_are_read_below_the_mmap_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool's plain-HTTP connections ask `READ_BYTES` a read, not asyncio's 256 KiB
    (which can cost an mmap, page faults and an munmap a read); a body larger than that
    still arrives whole, over the same connection."""
    body = bytes(range(256)) * 1200  # 300 KiB: several reads
    seen: list[asyncio.BaseTransport | None] = []
    connect = _transport._Connector.connect

    async def spy(self: _transport._Connector, *args: object, **kwargs: object) -> object:
        connection = await connect(self, *args, **kwargs)
        seen.append(connection.transport)
        return connection

    monkeypatch.setattr(_transport._Connector, "connect", spy)

    async def handler(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(body=body, content_type="image/png")

    app = aiohttp.web.Application()
    app.router.add_get("/big.png", handler)
    transport = AiohttpTransport()
    try:
        async with serving(app) as root:
            request = TransportRequest(
                method="GET", url=root + "/big.png", headers={}, max_response_bytes=2**20
            )
            answers = [await transport.send(request) for _ in range(2)]
    finally:
        await transport.aclose()
    assert [answer.body for answer in answers] == [body, body]
    assert len(seen) == 2
    assert seen[0] is seen[1]  # one connection, kept alive
    assert getattr(seen[0], "max_size", None) == READ_BYTES < 128 * 2**10


def test_request_headers_read_as_one_mapping() -> None:
    """RequestHeaders: extra wins, iteration and length count each name once."""
    headers = RequestHeaders({"A": "1", "B": "2"}, {"B": "3", "C": "4"})
    assert dict(headers) == {"A": "1", "B": "3", "C": "4"}
    assert len(headers) == 3
    assert "sk" not in repr(RequestHeaders({"Authorization": "Bearer sk"}, {}))


async def test_the_mock_transport_example_in_the_docs_runs() -> None:
    """The testing guide's MockTransport example is real code: run it."""
    from pathlib import Path

    guide = (Path(__file__).parent.parent / "docs" / "guides" / "testing.md").read_text()
    section = guide.split("## Tests with no sockets", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "testing.md", "exec"), namespace)
    await namespace["test_failed_prompts_are_skipped"]()  # type: ignore[operator]

"""FluxClient end to end over real sockets against the emulator."""

from __future__ import annotations

import email.utils
import logging
import time

import aiohttp
import pytest

from flux_async import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    ConflictError,
    DeadlineExceededError,
    FluxClient,
    ImageRequest,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RetryBudget,
    RetryPolicy,
    Timeout,
    UnprocessableEntityError,
    ValidationError,
)
from flux_async.emulator import Emulator, Fault

from .conftest import API_KEY


async def test_success_returns_images_the_server_serves(
    client: FluxClient, emulator: Emulator
) -> None:
    """A call returns the emulator's images, and their URLs really serve PNGs."""
    response = await client.generate("a lighthouse at dusk", aspect_ratio="16:9", n=2)
    assert len(response.data) == 2
    assert response.request_id is not None
    assert response.request_id.startswith("req_")
    assert emulator.stats.requests == 1
    assert emulator.stats.successes == 1
    sent = emulator.requests[0].body
    assert sent == {
        "prompt": "a lighthouse at dusk",
        "model": "flux-kontext-pro",
        "n": 2,
        "aspect_ratio": "16:9",
    }
    async with aiohttp.ClientSession() as http, http.get(response.urls[0]) as image:
        assert image.status == 200
        assert (await image.read()).startswith(b"\x89PNG")


async def test_b64_json(client: FluxClient) -> None:
    """response_format=b64_json returns decodable PNG bytes."""
    response = await client.generate("a cat", response_format="b64_json")
    assert response.data[0].decode().startswith(b"\x89PNG")


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
        (503, InternalServerError),
    ],
)
async def test_each_status_raises_its_class(
    client: FluxClient, emulator: Emulator, status: int, cls: type[APIStatusError]
) -> None:
    """Every error status surfaces as its own class with status, body and request id."""
    emulator.script(Fault.status(status))
    with pytest.raises(cls) as info:
        await client.generate("x", retry=RetryPolicy.never())
    exc = info.value
    assert exc.status_code == status
    assert exc.attempts == 1
    assert isinstance(exc.body, dict)
    assert "error" in exc.body
    assert exc.request_id is not None
    assert emulator.stats.requests == 1


@pytest.mark.parametrize(
    "fault",
    [
        Fault.status(429, headers={"Retry-After": "1"}),
        Fault.status(429, headers={"Retry-After": email.utils.formatdate(usegmt=True)}),
        Fault.status(503),
        Fault.status(502, headers={"Retry-After": "0"}),
        Fault.html(502),
        Fault.drop(),
    ],
    ids=["429-seconds", "429-date", "503", "502-retry-after", "html-502", "dropped-connection"],
)
async def test_retry_then_success(client: FluxClient, emulator: Emulator, fault: Fault) -> None:
    """A retryable failure is retried once and the call succeeds on the second attempt."""
    emulator.script(fault)
    response = await client.generate("x")
    assert len(response.data) == 1
    assert emulator.stats.requests == 2
    assert emulator.stats.successes == 1


async def test_idempotency_key_is_reused_across_attempts(
    client: FluxClient, emulator: Emulator
) -> None:
    """All attempts of one call carry the same Idempotency-Key; another call gets another."""
    emulator.script(Fault.status(503), Fault.drop())
    await client.generate("x")
    await client.generate("y")
    keys = [seen.idempotency_key for seen in emulator.requests]
    assert len(keys) == 4
    assert keys[0] == keys[1] == keys[2]
    assert keys[3] != keys[0]
    assert keys[0] is not None


async def test_retries_exhausted(client: FluxClient, emulator: Emulator) -> None:
    """After max_attempts failures the last error is raised with the attempt count."""
    emulator.script(*[Fault.status(500)] * 5)
    with pytest.raises(InternalServerError) as info:
        await client.generate("x")
    assert info.value.attempts == 4
    assert emulator.stats.requests == 4


async def test_429_is_counted_apart(emulator: Emulator) -> None:
    """429s do not use up max_attempts: 5 x 429 then 2 x 500 still succeeds with max_attempts=3."""
    emulator.script(*[Fault.status(429)] * 5, Fault.status(500), Fault.status(500))
    policy = RetryPolicy.for_tests(max_attempts=3)
    async with FluxClient(api_key=API_KEY, base_url=emulator.base_url, retry=policy) as client:
        await client.generate("x")
    assert emulator.stats.requests == 8


async def test_rate_limited_attempts_cap(emulator: Emulator) -> None:
    """A call that meets max_rate_limited_attempts 429s raises RateLimitError."""
    emulator.script(*[Fault.status(429, headers={"retry-after-ms": "5"})] * 3)
    policy = RetryPolicy.for_tests(max_rate_limited_attempts=3)
    async with FluxClient(api_key=API_KEY, base_url=emulator.base_url, retry=policy) as client:
        with pytest.raises(RateLimitError) as info:
            await client.generate("x")
    assert info.value.attempts == 3
    assert info.value.retry_after == 0.005


async def test_deadline_exceeded(emulator: Emulator) -> None:
    """A call that outlives its deadline raises DeadlineExceededError, cutting the attempt."""
    emulator.script(Fault.slow(30))
    async with FluxClient(api_key=API_KEY, base_url=emulator.base_url) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as info:
            await client.generate("x", deadline=0.3)
    assert time.monotonic() - started < 10  # not the 30 s the server would take
    assert info.value.attempts == 1
    assert emulator.stats.requests == 1


async def test_retry_after_past_deadline_fails_fast(emulator: Emulator) -> None:
    """A Retry-After longer than the time left raises RateLimitError at once, with retry_after."""
    emulator.script(Fault.status(429, headers={"Retry-After": "120"}))
    async with FluxClient(api_key=API_KEY, base_url=emulator.base_url) as client:
        started = time.monotonic()
        with pytest.raises(RateLimitError) as info:
            await client.generate("x", deadline=60)
    assert time.monotonic() - started < 30
    assert info.value.retry_after == 120
    assert emulator.stats.requests == 1


async def test_attempt_timeout_is_retried(emulator: Emulator) -> None:
    """A slow attempt times out (APITimeoutError) and the retry succeeds."""
    emulator.script(Fault.slow(30))
    async with FluxClient(
        api_key=API_KEY,
        base_url=emulator.base_url,
        timeout=Timeout(total=0.3),
        retry=RetryPolicy.for_tests(),
    ) as client:
        response = await client.generate("x")
    assert response.data
    assert emulator.stats.requests == 2


async def test_validation_failures_are_sent_nowhere(client: FluxClient, emulator: Emulator) -> None:
    """Bad fields raise ValidationError before any I/O: the emulator saw nothing."""
    with pytest.raises(ValidationError, match="aspect_ratio"):
        await client.generate("x", aspect_ratio="5:4")
    with pytest.raises(ValidationError, match="prompt"):
        await client.generate("")
    with pytest.raises(ValidationError, match="n="):
        await client.generate("x", n=0)
    with pytest.raises(ValidationError, match="colour"):
        await client.generate("x", colour="red")  # type: ignore[call-arg]
    assert emulator.stats.requests == 0


async def test_auth_failure_is_not_retried(emulator: Emulator) -> None:
    """A wrong key raises AuthenticationError after one attempt; no key says how to set one."""
    async with FluxClient(api_key="sk-wrong", base_url=emulator.base_url) as client:
        with pytest.raises(AuthenticationError) as info:
            await client.generate("x")
    assert info.value.attempts == 1
    async with FluxClient(base_url=emulator.base_url) as client:
        with pytest.raises(AuthenticationError) as info:
            await client.generate("x")
    assert "FLUX_API_KEY" in "".join(getattr(info.value, "__notes__", []))
    assert emulator.stats.requests == 2
    assert emulator.stats.unauthorized == 2


async def test_key_never_in_repr_logs_or_errors(
    emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The API key appears in no repr, log line or exception text."""
    caplog.set_level(logging.DEBUG, logger="flux_async")
    emulator.script(Fault.status(503), Fault.drop(), *[Fault.status(500)] * 4)
    async with FluxClient(
        api_key=API_KEY, base_url=emulator.base_url, retry=RetryPolicy.for_tests()
    ) as client:
        assert API_KEY not in repr(client)
        with pytest.raises(InternalServerError) as info:
            await client.generate("x")
    assert caplog.records, "retries are logged"
    for record in caplog.records:
        assert API_KEY not in record.getMessage()
    exc: BaseException | None = info.value
    while exc is not None:
        assert API_KEY not in str(exc) + repr(exc) + "".join(getattr(exc, "__notes__", []))
        exc = exc.__cause__ or exc.__context__


async def test_env_fallbacks(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """api_key and base_url fall back to FLUX_API_KEY and FLUX_BASE_URL."""
    monkeypatch.setenv("FLUX_API_KEY", API_KEY)
    monkeypatch.setenv("FLUX_BASE_URL", emulator.base_url)
    async with FluxClient() as client:
        assert client.base_url == emulator.base_url
        await client.generate("x")
    assert emulator.stats.successes == 1
    monkeypatch.delenv("FLUX_BASE_URL")
    assert FluxClient().base_url == "https://api.chainhub.tech/v1"


async def test_owned_session_is_closed_and_reuse_fails(emulator: Emulator) -> None:
    """The client closes the session it made; using it after close raises ClientClosedError."""
    client = FluxClient(api_key=API_KEY, base_url=emulator.base_url)
    await client.generate("x")
    session = client.transport.session
    assert session is not None
    await client.aclose()
    assert session.closed
    assert client.closed
    with pytest.raises(ClientClosedError, match="create a new one"):
        await client.generate("x")
    await client.aclose()  # idempotent


async def test_callers_session_is_not_closed(emulator: Emulator) -> None:
    """A caller-supplied session is used and left open."""
    async with aiohttp.ClientSession() as session:
        async with FluxClient(api_key=API_KEY, base_url=emulator.base_url, session=session) as c:
            await c.generate("x")
        assert not session.closed
        async with session.get(emulator.base_url.removesuffix("/v1") + "/health") as r:
            assert r.status == 200


async def test_n_above_ten_is_split_and_joined(client: FluxClient, emulator: Emulator) -> None:
    """n=23 is sent as requests for 10, 10 and 3 images, joined back in order."""
    response = await client.generate(ImageRequest(prompt="many", n=23))
    assert len(response.data) == 23
    assert sorted(seen.body["n"] for seen in emulator.requests if seen.body) == [3, 10, 10]
    assert len({seen.idempotency_key for seen in emulator.requests}) == 3


async def test_malformed_success_is_an_error(client: FluxClient, emulator: Emulator) -> None:
    """A 200 with a broken or empty body raises APIResponseValidationError and is not retried."""
    emulator.script(Fault.malformed("json"), Fault.malformed("empty_data"))
    with pytest.raises(APIResponseValidationError, match="not JSON"):
        await client.generate("x")
    with pytest.raises(APIResponseValidationError, match="empty"):
        await client.generate("x")
    assert emulator.stats.requests == 2


async def test_retry_budget_exhaustion_surfaces_failures(emulator: Emulator) -> None:
    """With an empty retry budget the failure is raised instead of retried, and says why."""
    emulator.script(*[Fault.status(503)] * 3)
    budget = RetryBudget(capacity=5)
    async with FluxClient(
        api_key=API_KEY,
        base_url=emulator.base_url,
        retry=RetryPolicy.for_tests(),
        retry_budget=budget,
    ) as client:
        with pytest.raises(InternalServerError) as info:
            await client.generate("x")
    assert info.value.attempts == 2
    assert "retry budget" in "".join(info.value.__notes__)
    assert emulator.stats.requests == 2
    assert budget.statistics().refused == 1


async def test_connection_refused_is_a_connection_error() -> None:
    """Nothing listening: APIConnectionError after the policy's attempts."""
    async with Emulator() as emu:
        url = emu.base_url
    async with FluxClient(base_url=url, retry=RetryPolicy.for_tests(max_attempts=2)) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.generate("x")
    assert info.value.attempts == 2


async def test_bad_base_url_is_refused_early() -> None:
    """A base_url that is not http(s) raises ValidationError at construction."""
    with pytest.raises(ValidationError, match="base_url"):
        FluxClient(base_url="ftp://example.com/v1")


async def test_failed_chunk_raises_the_typed_error(client: FluxClient, emulator: Emulator) -> None:
    """A split request whose chunk fails for good raises that chunk's typed error."""
    emulator.script(Fault.status(400))
    with pytest.raises(BadRequestError):
        await client.generate("many", n=15)
    assert emulator.stats.requests <= 2

"""The emulator over real sockets: contract, validation, auth, limits, faults, controls, CLI."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import os
import re
import signal
import struct
import sys
import zlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

import flux_async.emulator
from flux_async.emulator import Emulator, EmulatorStats, Fault, FaultRates, SeenRequest
from flux_async.emulator.__main__ import main

KEY = "sk-test"
PROMPT = "a lighthouse at dusk"
BODY: dict[str, Any] = {"model": "flux-kontext-pro", "prompt": PROMPT, "aspect_ratio": "1:1"}
_UNSET: Any = object()


@attrs.frozen
class Reply:
    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    def error(self) -> dict[str, Any]:
        error = self.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return dict(error)


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(api_keys=[KEY]) as emulator:
        yield emulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def generate(
    http: aiohttp.ClientSession,
    emu: Emulator,
    body: Any = _UNSET,
    *,
    key: str | None = KEY,
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
) -> Reply:
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    payload = data if data is not None else json.dumps(BODY if body is _UNSET else body).encode()
    sent.setdefault("Content-Type", "application/json")
    url = f"{emu.base_url}/images/generations"
    async with http.post(url, data=payload, headers=sent) as response:
        return Reply(response.status, response.headers.copy(), await response.text())


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with http.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.read()


def has_images(text: str) -> bool:
    try:
        return bool(json.loads(text)["data"])
    except (ValueError, KeyError):
        return False


def root_of(emu: Emulator) -> str:
    return emu.base_url.removesuffix("/v1")


def png_dimensions(data: bytes) -> tuple[int, int]:
    """Parse a PNG independently of the encoder: signature, chunk CRCs, IHDR, pixel data size."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, tags, idat = 8, [], b""
    width = height = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(tag + payload) == crc
        if tag == b"IHDR":
            width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", payload)
            assert (depth, colour) == (8, 2)
        elif tag == b"IDAT":
            idat += payload
        tags.append(tag)
        pos += 12 + length
    assert (tags[0], tags[-1]) == (b"IHDR", b"IEND")
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)
    return width, height


# -- success ----------------------------------------------------------------------------------


async def test_success_shape_and_served_images(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """A valid request gets created + n URL items whose URLs serve PNGs of the ratio's size."""
    reply = await generate(http, emu, {**BODY, "n": 2, "aspect_ratio": "16:9"})
    assert reply.status == 200
    assert re.fullmatch(r"req_[0-9a-f]+", reply.headers["x-request-id"])
    assert reply.headers["Content-Type"] == "application/json"
    payload = reply.json()
    assert isinstance(payload["created"], int)
    assert len(payload["data"]) == 2
    urls = [item["url"] for item in payload["data"]]
    assert all(item["revised_prompt"] == PROMPT for item in payload["data"])
    assert urls[0] != urls[1]
    for url in urls:
        assert url.startswith(emu.base_url + "/images/1024x576/")
        status, content_type, png = await fetch(http, url)
        assert (status, content_type) == (200, "image/png")
        assert png_dimensions(png) == (1024, 576)
    again = await generate(http, emu, {**BODY, "n": 2, "aspect_ratio": "16:9"})
    assert [item["url"] for item in again.json()["data"]] == urls


async def test_success_b64_json_matches_url_image(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """response_format=b64_json inlines the same PNG bytes the URL form serves."""
    body = {**BODY, "aspect_ratio": "9:16"}
    inline = await generate(http, emu, {**body, "response_format": "b64_json"})
    assert inline.status == 200
    item = inline.json()["data"][0]
    assert set(item) == {"b64_json", "revised_prompt"}
    png = base64.b64decode(item["b64_json"])
    assert png_dimensions(png) == (576, 1024)
    linked = await generate(http, emu, {**body, "response_format": "url"})
    _, _, served = await fetch(http, linked.json()["data"][0]["url"])
    assert served == png


@pytest.mark.parametrize(
    ("ratio", "dims"),
    [
        ("21:9", "1024x439"),
        ("16:9", "1024x576"),
        ("4:3", "1024x768"),
        ("3:2", "1024x683"),
        ("1:1", "1024x1024"),
        ("2:3", "683x1024"),
        ("3:4", "768x1024"),
        ("9:16", "576x1024"),
        ("9:21", "439x1024"),
    ],
)
async def test_aspect_ratio_sets_dimensions(
    emu: Emulator, http: aiohttp.ClientSession, ratio: str, dims: str
) -> None:
    """Each aspect ratio maps to a long side of 1024 and a rounded short side."""
    reply = await generate(http, emu, {**BODY, "aspect_ratio": ratio})
    assert f"/images/{dims}/" in reply.json()["data"][0]["url"]


async def test_size_overrides_aspect_ratio(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """An explicit size wins over aspect_ratio, up to 2048 a side."""
    reply = await generate(http, emu, {**BODY, "size": "512x256", "aspect_ratio": "9:16"})
    url = reply.json()["data"][0]["url"]
    _, _, png = await fetch(http, url)
    assert png_dimensions(png) == (512, 256)
    big = await generate(http, emu, {**BODY, "size": "2048x1792"})
    assert "/images/2048x1792/" in big.json()["data"][0]["url"]


async def test_optional_fields_and_unknown_keys_are_accepted(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """Every documented optional field, JSON nulls, and unknown keys pass validation."""
    body = {
        **BODY,
        "n": 1,
        "quality": "hd",
        "style": "natural",
        "user": "u-1",
        "response_format": None,
        "size": None,
        "seed": 42,
        "extra": {"nested": True},
    }
    reply = await generate(http, emu, body)
    assert reply.status == 200
    assert "/images/1024x1024/" in reply.json()["data"][0]["url"]


async def test_aspect_ratio_optional_when_not_required(http: aiohttp.ClientSession) -> None:
    """With require_aspect_ratio=False a request without it gets 1024x1024 images."""
    async with Emulator(require_aspect_ratio=False) as emu:
        reply = await generate(http, emu, {"prompt": PROMPT}, key=None)
    assert reply.status == 200
    assert "/images/1024x1024/" in reply.json()["data"][0]["url"]


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"prompt": None}, "prompt", "missing_required_parameter"),
        ({"prompt": ""}, "prompt", "empty_string"),
        ({"prompt": "   "}, "prompt", "empty_string"),
        ({"prompt": "x" * 1001}, "prompt", "string_above_max_length"),
        ({"prompt": 7}, "prompt", "invalid_type"),
        ({"aspect_ratio": None}, "aspect_ratio", "missing_required_parameter"),
        ({"aspect_ratio": "5:4"}, "aspect_ratio", "invalid_value"),
        ({"aspect_ratio": 1.5}, "aspect_ratio", "invalid_type"),
        ({"n": 0}, "n", "integer_below_min_value"),
        ({"n": 11}, "n", "integer_above_max_value"),
        ({"n": True}, "n", "invalid_type"),
        ({"n": "2"}, "n", "invalid_type"),
        ({"n": 2.0}, "n", "invalid_type"),
        ({"size": "big"}, "size", "invalid_value"),
        ({"size": "1024x1024\n"}, "size", "invalid_value"),
        ({"size": "4096x1024"}, "size", "invalid_value"),
        ({"size": "00x512"}, "size", "invalid_value"),
        ({"size": 1024}, "size", "invalid_type"),
        ({"quality": "ultra"}, "quality", "invalid_value"),
        ({"response_format": "png"}, "response_format", "invalid_value"),
        ({"style": "bold"}, "style", "invalid_value"),
        ({"model": 3}, "model", "invalid_type"),
        ({"user": ["u"]}, "user", "invalid_type"),
    ],
)
async def test_validation_failure_names_param(
    emu: Emulator,
    http: aiohttp.ClientSession,
    change: dict[str, Any],
    param: str,
    code: str,
) -> None:
    """Each invalid field gets a 400 OpenAI error naming that param."""
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
    reply = await generate(http, emu, body)
    assert reply.status == 400
    assert reply.headers["x-request-id"].startswith("req_")
    error = reply.error()
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert emu.stats.bad_requests == 1
    assert emu.requests[0].outcome == "bad_request"


@pytest.mark.parametrize("data", [b"not json", b"", b"[1, 2]", b'"prompt"', b"null", b"\xff"])
async def test_body_must_be_a_json_object(
    emu: Emulator, http: aiohttp.ClientSession, data: bytes
) -> None:
    """A body that is not a JSON object gets a 400 with no param."""
    reply = await generate(http, emu, data=data)
    assert reply.status == 400
    assert reply.error()["param"] is None
    assert emu.requests[0].body is None


# -- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "sk-wrong", ""])
async def test_missing_or_unknown_key_is_401(
    emu: Emulator, http: aiohttp.ClientSession, key: str | None
) -> None:
    """Configured keys make a missing, empty or unknown bearer a 401 invalid_api_key."""
    reply = await generate(http, emu, key=key)
    assert reply.status == 401
    assert reply.error()["code"] == "invalid_api_key"
    assert reply.headers["x-request-id"].startswith("req_")
    assert (emu.stats.unauthorized, emu.stats.successes) == (1, 0)
    assert emu.requests[0].outcome == "unauthorized"


async def test_auth_precedes_validation(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """An unauthenticated invalid request is answered 401, not 400."""
    reply = await generate(http, emu, {"prompt": ""}, key=None)
    assert reply.status == 401


async def test_no_keys_configured_accepts_any_bearer(http: aiohttp.ClientSession) -> None:
    """api_keys=None accepts requests with any bearer or none at all."""
    async with Emulator() as emu:
        statuses = [(await generate(http, emu, key=key)).status for key in (None, "whatever")]
        assert statuses == [200, 200]
        assert set(emu.stats.per_key) == {"anonymous", Emulator.key_id("whatever")}


# -- rate capacity and concurrency -----------------------------------------------------------


async def test_rate_capacity_429_headers_and_counters(http: aiohttp.ClientSession) -> None:
    """Past its burst a key gets 429 with retry-after-ms/Retry-After; rejections cost nothing."""
    async with Emulator(api_keys=[KEY], rate_limit=1, burst=1) as emu:
        first = await generate(http, emu)
        second = await generate(http, emu)
        third = await generate(http, emu)
    assert (first.status, second.status, third.status) == (200, 429, 429)
    wait_ms = int(second.headers["retry-after-ms"])
    assert 1 <= wait_ms <= 1000
    assert second.headers["Retry-After"] == "1"
    error = second.error()
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert second.headers["x-request-id"].startswith("req_")
    # Had the rejected request consumed capacity, the next permit would have moved a second on.
    assert int(third.headers["retry-after-ms"]) <= wait_ms
    stats = emu.stats
    assert (stats.successes, stats.rate_limited) == (1, 2)
    assert stats.per_key[Emulator.key_id(KEY)]["rate_limited"] == 2
    assert [r.outcome for r in emu.requests] == ["success", "rate_limited", "rate_limited"]


async def test_rate_burst_then_long_wait(http: aiohttp.ClientSession) -> None:
    """burst=3 admits three back-to-back requests; the fourth waits one emission interval."""
    async with Emulator(rate_limit=0.001, burst=3) as emu:
        statuses = [(await generate(http, emu, key=None)).status for _ in range(3)]
        limited = await generate(http, emu, key=None)
    assert statuses == [200, 200, 200]
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 999
    assert int(limited.headers["retry-after-ms"]) >= 999_000


async def test_rate_capacity_is_per_key(http: aiohttp.ClientSession) -> None:
    """Each key has its own capacity."""
    async with Emulator(api_keys=["sk-a", "sk-b"], rate_limit=0.001) as emu:
        statuses = [(await generate(http, emu, key=k)).status for k in ("sk-a", "sk-a", "sk-b")]
        assert statuses == [200, 429, 200]
        assert emu.stats.per_key[Emulator.key_id("sk-b")]["successes"] == 1


async def test_max_in_flight_rejects_the_excess(http: aiohttp.ClientSession) -> None:
    """With max_in_flight=2 and latency, the third of a simultaneous burst gets a 429."""
    async with Emulator(api_keys=[KEY], latency=0.2, max_in_flight=2) as emu:
        replies = await asyncio.gather(*(generate(http, emu) for _ in range(3)))
        assert sorted(r.status for r in replies) == [200, 200, 429]
        rejected = next(r for r in replies if r.status == 429)
        assert rejected.error()["code"] == "concurrency_limit_exceeded"
        assert rejected.headers["Retry-After"] == "1"
        stats = emu.stats
        assert (stats.successes, stats.concurrency_limited) == (2, 1)
        assert (stats.in_flight, stats.max_in_flight_seen) == (0, 3)
        after = await generate(http, emu)
        assert after.status == 200


# -- scripted faults --------------------------------------------------------------------------


async def test_fault_status_default_body_then_normal(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """Fault.status answers once with an OpenAI-style error; the next request is normal."""
    emu.script(Fault.status(503))
    failed = await generate(http, emu)
    assert failed.status == 503
    assert failed.error()["type"] == "server_error"
    assert failed.headers["x-request-id"].startswith("req_")
    assert (await generate(http, emu)).status == 200
    assert (emu.stats.faults, emu.stats.successes) == (1, 1)
    assert [r.outcome for r in emu.requests] == ["fault", "success"]
    assert emu.requests[0].status == 503


@pytest.mark.parametrize(
    ("fault", "content_type", "check"),
    [
        (
            Fault.status(429, headers={"Retry-After": "1"}),
            "application/json",
            lambda r: (
                r.headers["Retry-After"] == "1" and r.error()["code"] == "rate_limit_exceeded"
            ),
        ),
        (
            Fault.status(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
            "application/json",
            lambda r: r.headers["Retry-After"] == "Wed, 21 Oct 2015 07:28:00 GMT",
        ),
        (
            Fault.status(502, body="<html><body>Bad gateway</body></html>"),
            "text/html",
            lambda r: r.text == "<html><body>Bad gateway</body></html>",
        ),
        (Fault.status(500, body="oops"), "text/plain", lambda r: r.text == "oops"),
        (
            Fault.status(400, body={"detail": "custom"}),
            "application/json",
            lambda r: r.json() == {"detail": "custom"},
        ),
    ],
)
async def test_fault_status_headers_and_bodies(
    emu: Emulator, http: aiohttp.ClientSession, fault: Fault, content_type: str, check: Any
) -> None:
    """Fault.status passes custom headers through and sends str/dict bodies as given."""
    emu.script(fault)
    reply = await generate(http, emu)
    assert reply.status == fault.code
    assert reply.headers["Content-Type"].startswith(content_type)
    assert check(reply)


async def test_fault_retry_after_http_date(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """A Retry-After HTTP date built with email.utils.formatdate arrives unchanged."""
    date = email.utils.formatdate(1_700_000_000, usegmt=True)
    emu.script(Fault.status(429, headers={"Retry-After": date}))
    reply = await generate(http, emu)
    assert (reply.status, reply.headers["Retry-After"]) == (429, date)


async def test_scripted_fault_precedes_auth(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """A scripted fault answers before the auth check looks at the key."""
    emu.script(Fault.status(503))
    assert (await generate(http, emu, key=None)).status == 503
    assert (emu.stats.faults, emu.stats.unauthorized) == (1, 0)


async def test_script_applies_in_order(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """Scripted faults hit the next requests one each, in order."""
    emu.script(Fault.status(500), Fault.status(502))
    emu.script(Fault.html(504))
    statuses = [(await generate(http, emu)).status for _ in range(4)]
    assert statuses == [500, 502, 504, 200]


async def test_fault_drop_disconnects(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """Fault.drop closes the connection without a response; the server keeps serving."""
    emu.script(Fault.drop())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await generate(http, emu)
    assert (await generate(http, emu)).status == 200
    dropped = emu.requests[0]
    assert (dropped.outcome, dropped.status, dropped.body) == ("dropped", None, BODY)
    assert emu.stats.faults == 1


async def test_fault_slow_then_normal_processing(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """Fault.slow delays, then the request goes through auth and the rest as usual."""
    emu.script(Fault.slow(0.05), Fault.slow(0.0))
    assert (await generate(http, emu, key=None)).status == 401
    assert (await generate(http, emu)).status == 200
    stats = emu.stats
    assert (stats.faults, stats.unauthorized, stats.successes) == (2, 1, 1)
    assert [r.outcome for r in emu.requests] == ["unauthorized", "success"]


async def test_fault_malformed_kinds(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """Fault.malformed answers 200 with non-JSON, empty data, or no data."""
    emu.script(Fault.malformed(), Fault.malformed("empty_data"), Fault.malformed("no_data"))
    broken, empty, missing = [await generate(http, emu) for _ in range(3)]
    assert (broken.status, empty.status, missing.status) == (200, 200, 200)
    with pytest.raises(json.JSONDecodeError):
        broken.json()
    assert empty.json()["data"] == []
    assert isinstance(missing.json()["created"], int)
    assert "data" not in missing.json()
    assert emu.stats.faults == 3
    assert emu.stats.successes == 0


@pytest.mark.parametrize("status", [502, 504])
async def test_fault_html_proxy_page(
    emu: Emulator, http: aiohttp.ClientSession, status: int
) -> None:
    """Fault.html answers with an nginx-style HTML error page."""
    emu.script(Fault.html(status) if status != 502 else Fault.html())
    reply = await generate(http, emu)
    assert reply.status == status
    assert reply.headers["Content-Type"].startswith("text/html")
    assert reply.text.lstrip().startswith("<html>")
    assert f"<h1>{status} " in reply.text


def test_fault_and_rates_reject_bad_arguments() -> None:
    """Fault and FaultRates constructors refuse impossible values."""
    with pytest.raises(ValueError, match="status"):
        Fault.status(99)
    with pytest.raises(ValueError, match="seconds"):
        Fault.slow(-1)
    with pytest.raises(ValueError, match="kind"):
        Fault.malformed("xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status"):
        Fault.html(200)
    with pytest.raises(ValueError, match="rate"):
        FaultRates(error_rate=1.5)
    with pytest.raises(ValueError, match="exceed"):
        FaultRates(error_rate=0.6, drop_rate=0.6)
    with pytest.raises(TypeError, match="Fault"):
        Emulator().script("503")  # type: ignore[arg-type]


def test_emulator_rejects_bad_arguments() -> None:
    """The Emulator constructor refuses impossible settings."""
    cases: list[dict[str, Any]] = [
        {"api_keys": []},
        {"latency": -1},
        {"rate_limit": 0},
        {"burst": 0},
        {"max_in_flight": 0},
        {"port": 70000},
    ]
    for kwargs in cases:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            Emulator(**kwargs)


# -- random faults ----------------------------------------------------------------------------


@pytest.mark.parametrize("error_status", [500, 503])
async def test_fault_rates_error_rate_one(http: aiohttp.ClientSession, error_status: int) -> None:
    """error_rate=1.0 turns every admitted request into error_status."""
    rates = FaultRates(error_rate=1.0, error_status=error_status)
    async with Emulator(api_keys=[KEY], faults=rates) as emu:
        replies = [await generate(http, emu) for _ in range(4)]
        assert {r.status for r in replies} == {error_status}
        assert all(r.error()["type"] == "server_error" for r in replies)
        assert (emu.stats.faults, emu.stats.successes) == (4, 0)
        # Random faults come after validation: a bad request is still a 400.
        assert (await generate(http, emu, {"prompt": PROMPT})).status == 400


async def test_fault_rates_drop_malformed_slow(http: aiohttp.ClientSession) -> None:
    """drop_rate, malformed_rate and slow_rate at 1.0 each take effect."""
    async with Emulator(faults=FaultRates(drop_rate=1.0)) as emu:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await generate(http, emu, key=None)
    async with Emulator(faults=FaultRates(malformed_rate=1.0)) as emu:
        reply = await generate(http, emu, key=None)
        assert reply.status == 200
        assert not has_images(reply.text)
    async with Emulator(faults=FaultRates(slow_rate=1.0, slow_seconds=0.01)) as emu:
        assert (await generate(http, emu, key=None)).status == 200
        assert (emu.stats.faults, emu.stats.successes) == (1, 1)


async def test_fault_rates_are_seeded(http: aiohttp.ClientSession) -> None:
    """The same seed gives the same fault sequence; reset() restarts it."""
    rates = FaultRates(error_rate=0.5)
    runs = []
    for _ in range(2):
        async with Emulator(faults=rates, seed=7) as emu:
            runs.append([(await generate(http, emu, key=None)).status for _ in range(12)])
            emu.reset()
            runs.append([(await generate(http, emu, key=None)).status for _ in range(12)])
    assert runs[0] == runs[1] == runs[2] == runs[3]
    assert set(runs[0]) == {200, 500}


# -- idempotency ------------------------------------------------------------------------------


async def test_dedupe_replays_first_success(http: aiohttp.ClientSession) -> None:
    """With dedupe, a repeated Idempotency-Key after a success replays the stored response."""
    headers = {"Idempotency-Key": "idem-1"}
    async with Emulator(api_keys=[KEY], dedupe_idempotency=True, rate_limit=0.001) as emu:
        emu.script(Fault.status(500))
        failed = await generate(http, emu, headers=headers)
        first = await generate(http, emu, headers=headers)
        replay = await generate(http, emu, headers=headers)
        other = await generate(http, emu, headers={"Idempotency-Key": "idem-2"})
        assert (failed.status, first.status, replay.status) == (500, 200, 200)
        assert replay.text == first.text
        assert replay.headers["x-request-id"] == first.headers["x-request-id"]
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first.headers
        # A replay costs no rate capacity; a new key does.
        assert other.status == 429
        assert (emu.stats.replayed, emu.stats.successes) == (1, 1)
        outcomes = [r.outcome for r in emu.requests]
        assert outcomes == ["fault", "success", "replayed", "rate_limited"]
        assert [r.idempotency_key for r in emu.requests][:3] == ["idem-1"] * 3


async def test_without_dedupe_repeats_are_new(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """Without dedupe, a repeated Idempotency-Key is just another request."""
    headers = {"Idempotency-Key": "idem-1"}
    replies = [await generate(http, emu, headers=headers) for _ in range(2)]
    assert replies[0].headers["x-request-id"] != replies[1].headers["x-request-id"]
    assert (emu.stats.replayed, emu.stats.successes) == (0, 2)


# -- recording, stats, reset, control endpoints -----------------------------------------------


async def test_seen_requests_are_recorded(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """emu.requests lists SeenRequest in arrival order with key fingerprint, body and outcome."""
    await generate(http, emu, headers={"Idempotency-Key": "k1"})
    await generate(http, emu, {"prompt": PROMPT})
    first, second = emu.requests
    assert isinstance(first, SeenRequest)
    assert first.time <= second.time
    assert (first.key_id, first.idempotency_key, first.body) == (Emulator.key_id(KEY), "k1", BODY)
    assert (first.status, first.outcome) == (200, "success")
    assert (second.idempotency_key, second.status, second.outcome) == (None, 400, "bad_request")


async def test_record_requests_off(http: aiohttp.ClientSession) -> None:
    """record_requests=False keeps no request log but still counts."""
    async with Emulator(record_requests=False) as emu:
        await generate(http, emu, key=None)
        assert emu.requests == []
        assert emu.stats.successes == 1


async def test_stats_endpoint_and_http_reset(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """GET /_emulator/stats mirrors emu.stats (plus the log on request); POST reset zeroes it."""
    await generate(http, emu)
    await generate(http, emu, {"prompt": PROMPT})
    status, _, raw = await fetch(http, f"{root_of(emu)}/_emulator/stats")
    assert status == 200
    snapshot = json.loads(raw)
    assert snapshot == emu.stats.snapshot()
    assert (snapshot["requests"], snapshot["successes"], snapshot["bad_requests"]) == (2, 1, 1)
    assert snapshot["per_key"][Emulator.key_id(KEY)]["bad_requests"] == 1
    _, _, raw = await fetch(http, f"{root_of(emu)}/_emulator/stats?requests=1")
    detailed = json.loads(raw)
    assert detailed["request_count"] == 2
    assert [entry[1:] for entry in detailed["requests"]] == [["success", 200], ["bad_request", 400]]
    assert all(isinstance(entry[0], float) for entry in detailed["requests"])

    emu.script(Fault.status(500))
    async with http.post(f"{root_of(emu)}/_emulator/reset") as response:
        assert response.status == 200
        assert (await response.json())["requests"] == 0
    assert emu.stats.snapshot() == EmulatorStats().snapshot()
    assert emu.requests == []
    assert (await generate(http, emu)).status == 200  # the script went too


async def test_reset_in_process(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """reset() zeroes counters, clears the log and the script, and refills rate capacity."""
    emu.script(Fault.drop())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await generate(http, emu)
    emu.script(Fault.status(500))
    emu.reset()
    assert (emu.stats.requests, emu.stats.faults, emu.stats.per_key) == (0, 0, {})
    assert emu.requests == []
    assert (await generate(http, emu)).status == 200


async def test_health_and_unknown_routes(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """/health is 200; wrong methods are 405 and unknown paths 404, both as JSON errors."""
    assert (await fetch(http, f"{root_of(emu)}/health"))[0] == 200
    async with http.get(f"{emu.base_url}/images/generations") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert (await response.json())["error"]["type"] == "invalid_request_error"
    async with http.post(f"{root_of(emu)}/health") as response:
        assert response.status == 405
    for url in (f"{emu.base_url}/nope", f"{emu.base_url}/images/4096x10/abcd.png"):
        async with http.post(url) if url.endswith("nope") else http.get(url) as response:
            assert response.status == 404
            assert "Invalid URL" in (await response.json())["error"]["message"]
    assert emu.stats.requests == 0


async def test_key_never_shown() -> None:
    """API keys appear nowhere: repr, stats, the stats endpoint, error messages, the log."""
    secret, wrong = "sk-super-secret-value-1234", "sk-wrong-secret-value-9876"
    async with Emulator(api_keys=[secret]) as emu, aiohttp.ClientSession() as http:
        ok = await generate(http, emu, key=secret)
        denied = await generate(http, emu, key=wrong)
        _, _, stats_json = await fetch(http, f"{root_of(emu)}/_emulator/stats?requests=1")
        shown = [
            repr(emu),
            repr(emu.stats),
            repr(emu.requests),
            json.dumps(emu.stats.snapshot()),
            stats_json.decode(),
            denied.text,
            ok.text,
        ]
    assert (ok.status, denied.status) == (200, 401)
    for text in shown:
        assert secret not in text
        assert wrong not in text
    assert re.fullmatch(r"key-[0-9a-f]{8}", Emulator.key_id(secret))
    assert Emulator.key_id(secret) in repr(emu)
    assert Emulator.key_id(secret) in emu.stats.per_key


# -- lifecycle --------------------------------------------------------------------------------


async def test_lifecycle_start_close(http: aiohttp.ClientSession) -> None:
    """base_url needs a running emulator; start twice fails; close is idempotent."""
    emu = Emulator()
    with pytest.raises(RuntimeError):
        _ = emu.base_url
    await emu.start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", emu.base_url)
        with pytest.raises(RuntimeError):
            await emu.start()
        assert (await generate(http, emu, key=None)).status == 200
    finally:
        await emu.close()
    await emu.close()
    with pytest.raises(RuntimeError):
        _ = emu.base_url


async def test_close_drops_waiting_requests_promptly(http: aiohttp.ClientSession) -> None:
    """close() ends a request stuck in a slow fault at once: the client sees a disconnect."""
    emu = Emulator(api_keys=[KEY])
    await emu.start()
    try:
        emu.script(Fault.slow(60))
        # Whichever request arrives first takes the slow fault; the other answering proves it.
        tasks = [asyncio.create_task(generate(http, emu)) for _ in range(2)]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        assert [t.result().status for t in done] == [200]
    finally:
        async with asyncio.timeout(5):
            await emu.close()
    (stuck,) = pending
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await stuck
    assert [r.outcome for r in emu.requests] == ["dropped", "success"]
    assert emu.stats.in_flight == 0


# -- command line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--latency", "-1"], "--latency"),
        (["--rate-limit", "0"], "--rate-limit"),
        (["--burst", "0"], "--burst"),
        (["--max-in-flight", "many"], "--max-in-flight"),
        (["--error-rate", "1.5"], "--error-rate"),
        (["--error-status", "200"], "--error-status"),
        (["--slow-seconds", "nan"], "--slow-seconds"),
        (["--port", "70000"], "--port"),
        (["--error-rate", "0.6", "--drop-rate", "0.6"], "--drop-rate"),
    ],
)
def test_cli_rejects_bad_flag_values(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad flag value is an argparse error (exit 2) that names the flag."""
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    assert flag in capsys.readouterr().err


async def test_cli_ready_serves_and_exits_on_sigterm(http: aiohttp.ClientSession) -> None:
    """`python -m flux_async.emulator --port 0` prints READY, serves, and exits 0 on SIGTERM."""
    secret = "sk-cli-secret-0001"
    root = str(Path(flux_async.emulator.__file__).parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        "FLUX_EMULATOR_API_KEYS": "sk-env-a, sk-env-b",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "flux_async.emulator",
        "--port",
        "0",
        "--api-key",
        secret,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(15):
            line = (await proc.stdout.readline()).decode()
        match = re.fullmatch(r"READY (http://127\.0\.0\.1:\d+/v1)\n", line)
        assert match, line
        base_url = match[1]
        assert (await fetch(http, base_url.removesuffix("/v1") + "/health"))[0] == 200
        url = f"{base_url}/images/generations"
        for key, expected in ((secret, 200), ("sk-env-b", 200), ("sk-nope", 401)):
            headers = {"Authorization": f"Bearer {key}"}
            async with http.post(url, json=BODY, headers=headers) as response:
                assert response.status == expected
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            rest, errors = await proc.communicate()
        assert proc.returncode == 0, errors.decode()
        assert rest == b""
        assert secret.encode() not in errors
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()

"""Bad input never makes the emulator answer 5xx, and every 4xx has the OpenAI error shape.

Explicit cases for each kind of bad input (deep nesting, lone surrogates, bad encodings,
oversize bodies, bad Content-Encoding, malformed HTTP), then hypothesis fuzzing of JSON
values, raw bytes and headers. Requests go over a raw socket where aiohttp's client would
refuse to send them (or would fix them up).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flux_async.emulator._pipeline
from flux_async.emulator import Emulator

KEY = "sk-test"
PATH = "/v1/images/generations"
BODY: dict[str, Any] = {"prompt": "a lighthouse at dusk", "aspect_ratio": "1:1"}
VALID = json.dumps(BODY).encode()
MAX_BODY = 1024**2
ERROR_KEYS = {"message", "type", "param", "code"}


@attrs.frozen
class Reply:
    status: int
    headers: Mapping[str, str]  # names lower-cased
    body: bytes

    def error(self) -> dict[str, Any]:
        """The OpenAI error object, after checking the whole answer has the error shape."""
        assert 400 <= self.status < 500, (self.status, self.body[:300])
        assert self.headers["content-type"] == "application/json", self.headers
        assert self.headers["x-request-id"].startswith("req_")
        payload = json.loads(self.body)
        assert list(payload) == ["error"]
        error = payload["error"]
        assert set(error) == ERROR_KEYS
        assert isinstance(error["message"], str)
        assert error["message"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
        return dict(error)


def port_of(emu: Emulator) -> int:
    return int(emu.base_url.rsplit(":", 1)[1].split("/", 1)[0])


def parse_reply(data: bytes) -> Reply:
    """Parse an HTTP/1.x answer read to EOF, skipping interim 1xx answers."""
    while True:
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status >= 200:
            length = int(headers.get("content-length", len(rest)))
            return Reply(status, headers, rest[:length])
        data = rest


async def exchange(port: int, request: bytes) -> Reply:
    """Send raw bytes, read the answer until the server closes the connection."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
    return parse_reply(data)


async def post_raw(
    port: int,
    body: bytes,
    headers: Mapping[str, bytes] | None = None,
    *,
    key: bytes = KEY.encode(),
) -> Reply:
    """POST ``body`` with exactly these header bytes (plus Host, Content-Length, close)."""
    lines = [
        f"POST {PATH} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Authorization: Bearer " + key,
        b"Connection: close",
        b"Content-Length: %d" % len(body),
    ]
    lines += [name.encode() + b": " + value for name, value in (headers or {}).items()]
    return await exchange(port, b"\r\n".join(lines) + b"\r\n\r\n" + body)


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(api_keys=[KEY]) as emulator:
        yield emulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress only concerns answers; requests are sent exactly as given.
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    emu: Emulator,
    data: bytes | AsyncIterator[bytes],
    headers: Mapping[str, str] | None = None,
) -> Reply:
    # aiohttp warns about large raw bytes bodies (filterwarnings = error); a file object is fine.
    payload = io.BytesIO(data) if isinstance(data, bytes) and len(data) >= MAX_BODY else data
    sent = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    async with http.post(f"{emu.base_url}/images/generations", data=payload, headers=sent) as r:
        lowered = {k.lower(): v for k, v in r.headers.items()}
        return Reply(r.status, lowered, await r.read())


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    return b"[" * depth + leaf + b"]" * depth


def with_field(name: str, raw_json_value: bytes) -> bytes:
    return VALID[:-1] + b', "' + name.encode() + b'": ' + raw_json_value + b"}"


# -- the JSON text ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (nested(100_000), "nested too deeply"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (with_field("extra", nested(100_000)), "nested too deeply"),
        (b'{"prompt": "\xff", "aspect_ratio": "1:1"}', "not UTF-8"),
        # A surrogate written as UTF-8 bytes rather than as a \u escape.
        (b'{"prompt": "\xed\xa0\x80", "aspect_ratio": "1:1"}', "not UTF-8"),
        (b'{"prompt": "x", "aspect_ratio": "1:1", "n": 1' + b"0" * 5000 + b"}", "parse"),
    ],
    ids=["deep-array", "deep-object", "deep-field", "not-utf8", "utf8-surrogate", "long-int"],
)
async def test_unparseable_text_is_400(
    emu: Emulator, http: aiohttp.ClientSession, data: bytes, says: str
) -> None:
    """Deep nesting, bytes that are not UTF-8 and over-long numbers are 400s with no param."""
    reply = await post(http, emu, data)
    error = reply.error()
    assert reply.status == 400
    assert says in error["message"]
    assert error["param"] is None
    assert emu.stats.bad_requests == 1
    assert (emu.requests[0].outcome, emu.requests[0].body) == ("bad_request", None)


async def test_reasonable_nesting_is_accepted(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """The nesting limit leaves room for any sane body: 100 levels in an unknown key is fine."""
    reply = await post(http, emu, with_field("extra", nested(100)))
    assert reply.status == 200


@pytest.mark.parametrize(
    ("data", "param"),
    [
        (b'{"prompt": "a \\ud800 b", "aspect_ratio": "1:1"}', "prompt"),
        (b'{"prompt": "x\\uDFFF", "aspect_ratio": "1:1"}', "prompt"),
        (b'{"prompt": "\\ude00\\ud83d", "aspect_ratio": "1:1"}', "prompt"),  # pair reversed
        (with_field("model", b'"\\udc00"'), "model"),
        (with_field("aspect_ratio", b'"\\ud800"'), "aspect_ratio"),
        (with_field("meta", b'{"deep": [1, ["\\ud800"]]}'), "meta"),
        (with_field("meta", b'{"\\udbff": 1}'), "meta"),
        (with_field("\\ud800", b"1"), None),
    ],
    ids=["high", "low", "reversed", "model", "ratio", "nested", "nested-key", "key"],
)
async def test_lone_surrogate_is_400(
    emu: Emulator, http: aiohttp.ClientSession, data: bytes, param: str | None
) -> None:
    """A lone UTF-16 surrogate escape anywhere in the body is a 400 naming the top-level field."""
    reply = await post(http, emu, data)
    error = reply.error()
    assert reply.status == 400
    assert (error["param"], error["code"]) == (param, "invalid_unicode")
    assert "surrogate" in error["message"]
    assert emu.requests[0].body is None


async def test_surrogate_pairs_and_other_encodings_still_work(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """Escaped non-BMP characters (as json.dumps writes them), UTF-16 and a BOM are accepted."""
    emoji = {**BODY, "prompt": "a cat \U0001f408 at dusk"}
    ascii_escaped = json.dumps(emoji).encode()
    assert b"\\ud83d\\udc08" in ascii_escaped
    for data in (
        ascii_escaped,
        json.dumps(emoji, ensure_ascii=False).encode(),
        json.dumps(emoji).encode("utf-16"),
        b"\xef\xbb\xbf" + VALID,
    ):
        reply = await post(http, emu, data)
        assert reply.status == 200, reply.body
    assert emu.requests[0].body == emoji
    assert json.loads(reply.body)["data"][0]["revised_prompt"] == BODY["prompt"]


# -- the body on the wire ---------------------------------------------------------------------


async def test_oversize_body_is_413_json(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """1 MiB of body is accepted; one byte more is a 413 with the JSON error shape."""
    padded = VALID[:-1] + b" " * (MAX_BODY - len(VALID)) + b"}"
    assert len(padded) == MAX_BODY
    assert (await post(http, emu, padded)).status == 200
    reply = await post(http, emu, padded + b" ")
    error = reply.error()
    assert reply.status == 413
    assert error["code"] == "request_too_large"
    assert str(MAX_BODY) in error["message"]
    assert emu.requests[1].outcome == "bad_request"


async def test_oversize_chunked_and_inflated_bodies_are_413(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """The limit holds for a chunked body and for what a small gzip body inflates to."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 65536

    reply = await post(http, emu, chunks())
    assert (reply.status, reply.error()["code"]) == (413, "request_too_large")
    bomb = gzip.compress(b" " * (8 * MAX_BODY))
    assert len(bomb) < MAX_BODY // 20
    reply = await post(http, emu, bomb, {"Content-Encoding": "gzip"})
    assert (reply.status, reply.error()["code"]) == (413, "request_too_large")


async def test_auth_precedes_body_errors(emu: Emulator) -> None:
    """An unauthenticated oversize or broken body is a 401, as for any other invalid body."""
    reply = await post_raw(port_of(emu), b" " * (MAX_BODY + 1), key=b"sk-wrong")
    assert reply.status == 401
    assert reply.error()["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("gzip", b"this is not gzip"),
        ("gzip", gzip.compress(VALID)[:12] + b"\x00garbage\xff" * 4),
        ("deflate", b"this is not deflate"),
    ],
    ids=["gzip-garbage", "gzip-corrupt", "deflate-garbage"],
)
async def test_bad_compressed_body_is_400(
    emu: Emulator, http: aiohttp.ClientSession, encoding: str, data: bytes
) -> None:
    """A body that does not inflate is a 400 that closes the connection; the next one works."""
    reply = await post(http, emu, data, {"Content-Encoding": encoding})
    error = reply.error()
    assert reply.status == 400
    assert error["code"] == "invalid_content_encoding"
    assert reply.headers.get("connection", "").lower() == "close"
    assert emu.requests[0].outcome == "bad_request"
    # The pooled session must not reuse the connection the emulator is about to close.
    assert (await post(http, emu, VALID)).status == 200


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_bodies_still_work(
    emu: Emulator, http: aiohttp.ClientSession, encoding: str
) -> None:
    """Well-formed gzip and deflate bodies are inflated and accepted."""
    data = gzip.compress(VALID) if encoding == "gzip" else zlib.compress(VALID)
    reply = await post(http, emu, data, {"Content-Encoding": encoding})
    assert reply.status == 200


@pytest.mark.parametrize("encoding", ["br", "zstd"])
async def test_undecodable_content_encoding_is_400_json(emu: Emulator, encoding: str) -> None:
    """br/zstd bodies that are not valid (or need a library aiohttp lacks here) are 400 JSON."""
    headers = {"Content-Encoding": encoding.encode()}
    reply = await post_raw(port_of(emu), b"\x00not compressed\xff", headers)
    assert reply.status == 400
    reply.error()


# -- the HTTP message -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: \x7f\x01\r\n"
        b"Content-Length: 2\r\n\r\n{}",
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 99999999999999999999999\r\n\r\n",
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"\r\nzz\r\n",
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Content-Length: 3\r\n\r\n{}",
    ],
    ids=["request-line", "header-too-long", "control-char", "length-overflow", "chunk", "two-cl"],
)
async def test_malformed_http_is_400_json(emu: Emulator, request_bytes: bytes) -> None:
    """Requests aiohttp cannot parse get its 400, in the JSON error shape, then a close."""
    reply = await exchange(port_of(emu), request_bytes)
    assert reply.status == 400
    reply.error()
    assert emu.stats.requests == 0  # never reached the generation handler


async def test_unknown_expect_is_417_json(emu: Emulator) -> None:
    """aiohttp's 417 for an unknown Expect header, which no middleware sees, is JSON too."""
    reply = await post_raw(port_of(emu), VALID, {"Expect": b"something-else"})
    assert reply.status == 417
    assert "something-else" in reply.error()["message"]


async def test_expect_100_continue_still_works(emu: Emulator, http: aiohttp.ClientSession) -> None:
    """The Expect handler that answers unknown expectations as JSON still sends 100 Continue."""
    url = f"{emu.base_url}/images/generations"
    headers = {"Authorization": f"Bearer {KEY}"}
    async with http.post(url, data=VALID, headers=headers, expect100=True) as response:
        assert response.status == 200


async def test_a_crash_is_a_json_500(
    emu: Emulator, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should a handler ever raise, the 500 has the error shape and does not leak the text."""

    def explode(body: Any, require_aspect_ratio: bool) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(flux_async.emulator._pipeline, "validate", explode)
    reply = await post(http, emu, VALID)
    assert reply.status == 500
    assert reply.headers["x-request-id"].startswith("req_")
    error = json.loads(reply.body)["error"]
    assert (error["type"], error["param"], error["code"]) == ("server_error", None, None)
    assert "secret" not in error["message"]


async def test_bearer_that_is_not_utf8_is_401(emu: Emulator) -> None:
    """Bytes that are not UTF-8 in the bearer key are an unknown key, not a crash."""
    reply = await post_raw(port_of(emu), VALID, key=b"\xff\xfe\x80")
    assert reply.status == 401
    assert reply.error()["code"] == "invalid_api_key"
    assert emu.requests[0].key_id.startswith("key-")


async def test_bad_input_without_keys_configured() -> None:
    """Without keys, a non-UTF-8 bearer reaches validation (and its fingerprint is stable)."""
    async with Emulator() as emu:
        first = await post_raw(port_of(emu), b"[", key=b"\xff")
        second = await post_raw(port_of(emu), VALID, key=b"\xff")
        assert (first.status, second.status) == (400, 200)
        assert emu.requests[0].key_id == emu.requests[1].key_id


# -- fuzzing ----------------------------------------------------------------------------------

# Hypothesis runs the examples of one test synchronously, so each fuzz test runs one emulator
# on a loop of its own (asyncio.Runner) and drives it with runner.run for every example.
FUZZ = settings(
    deadline=None,
    max_examples=120,
    database=None,  # keep the repository free of a .hypothesis directory
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# st.text() leaves out surrogates; mix lone ones in on purpose.
_surrogates = st.characters(categories=["Cs"])
strings = st.one_of(
    st.text(max_size=12),
    st.lists(st.one_of(st.characters(), _surrogates), max_size=6).map("".join),
    st.sampled_from(["1:1", "16:9", "1024x1024", "b64_json", "url", "hd", "vivid", ""]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    strings,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(strings, inner, max_size=4)
    ),
    max_leaves=12,
)


# Near-valid bodies get past the first checks, so the fuzzing reaches every field, and success.
def valid_or_not(*valid: Any) -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(valid), json_values)


bodies = st.fixed_dictionaries(
    {
        "prompt": st.one_of(strings.map(lambda text: "a " + text), json_values),
        "aspect_ratio": valid_or_not("1:1", "16:9", "9:21"),
    },
    optional={
        "n": valid_or_not(1, 2, 10),
        "size": valid_or_not("256x256", "1024x1792", "2048x2048"),
        "quality": valid_or_not("standard", "hd"),
        "response_format": valid_or_not("url", "b64_json"),
        "style": valid_or_not("vivid", "natural"),
        "model": st.one_of(strings, json_values),
        "user": st.one_of(strings, json_values),
        "extra": json_values,
    },
)


def encode(value: Any, ascii_only: bool) -> bytes:
    # ensure_ascii writes a lone surrogate as a \u escape; without it, as (invalid) UTF-8 bytes.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def check(reply: Reply) -> None:
    """The fuzzing oracle: never 5xx; a 4xx is the OpenAI error; a 200 has images."""
    assert reply.status < 500, (reply.status, reply.body[:300])
    assert reply.headers["x-request-id"].startswith("req_")
    if reply.status == 200:
        assert json.loads(reply.body)["data"]
    else:
        reply.error()


def fuzz(test: Any) -> None:
    """Run ``test(runner, port)`` against one emulator shared by all its examples."""
    with asyncio.Runner() as runner:
        emu = Emulator(api_keys=[KEY])
        runner.run(emu.start())
        try:
            test(runner, port_of(emu))
        finally:
            runner.run(emu.close())


def test_fuzz_json_values() -> None:
    """Arbitrary JSON values and near-valid bodies, ASCII-escaped or as raw UTF-8."""

    def run(runner: asyncio.Runner, port: int) -> None:
        @FUZZ
        @given(value=st.one_of(json_values, bodies), ascii_only=st.booleans())
        def example(value: Any, ascii_only: bool) -> None:
            check(runner.run(post_raw(port, encode(value, ascii_only))))

        example()

    fuzz(run)


def test_fuzz_bytes() -> None:
    """Arbitrary bytes, and valid bodies with a few bytes overwritten."""

    def run(runner: asyncio.Runner, port: int) -> None:
        @FUZZ
        @given(
            data=st.one_of(
                st.binary(max_size=256),
                st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.binary(max_size=3))).map(
                    lambda edits: _apply(VALID, edits)
                ),
            )
        )
        def example(data: bytes) -> None:
            check(runner.run(post_raw(port, data)))

        example()

    fuzz(run)


def _apply(data: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    for at, replacement in edits:
        data = data[:at] + replacement + data[at + len(replacement) :]
    return data


# Header values: known ones, and any bytes but CR/LF (which would end the header line).
header_values = st.one_of(
    st.sampled_from(
        [
            b"application/json",
            b"application/json; charset=utf-16",
            b"text/plain",
            b"",
            b"gzip",
            b"deflate",
            b"br",
            b"zstd",
            b"identity",
            b"gzip, deflate",
            b"x-gzip",
            b"100-continue",
            b"Bearer " + KEY.encode(),
        ]
    ),
    st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
header_sets = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": header_values,
        "Content-Encoding": header_values,
        "Expect": header_values,
        "Idempotency-Key": header_values,
    },
)
wire_bodies = st.one_of(
    st.just(VALID),
    st.just(gzip.compress(VALID)),
    st.just(zlib.compress(VALID)),
    st.just(VALID.decode().encode("utf-16")),
    st.binary(max_size=64),
)


def test_fuzz_headers() -> None:
    """Arbitrary Content-Type, Content-Encoding, Expect, Idempotency-Key and bearer bytes."""

    def run(runner: asyncio.Runner, port: int) -> None:
        @FUZZ
        @given(
            headers=header_sets,
            body=wire_bodies,
            key=st.one_of(st.just(KEY.encode()), header_values),
        )
        def example(headers: dict[str, bytes], body: bytes, key: bytes) -> None:
            check(runner.run(post_raw(port, body, headers, key=key)))

        example()

    fuzz(run)

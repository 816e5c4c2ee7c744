"""Bodies from the network: every malformed one is a typed error, and errors stay small."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from flux_async import (
    APIResponseValidationError,
    APIStatusError,
    FluxClient,
    ImagesResponse,
    InternalServerError,
    RateLimitError,
)
from flux_async._exceptions import (
    MAX_BODY_EXCERPT,
    MAX_PARSED_BODY,
    _message_from_body,
    error_body,
    error_for_status,
    parse_json,
)

# No example database: the suite leaves no files behind.
FUZZ = settings(max_examples=300, deadline=None, database=None)

OK = b'{"created": 1700000000, "data": [{"url": "https://cdn.example/1.png"}]}'


def _nested(depth: int) -> bytes:
    return b'{"created": 1, "data": [{"url": "u"}], "x": ' + b"[" * depth + b"]" * depth + b"}"


MALFORMED = [
    pytest.param(b'{"created": NaN, "data": [{"url": "u"}]}', "NaN", id="nan"),
    pytest.param(b'{"created": Infinity, "data": [{"url": "u"}]}', "Infinity", id="infinity"),
    pytest.param(b'{"created": -Infinity, "data": [{"url": "u"}]}', "Infinity", id="-infinity"),
    pytest.param(b'{"created": 1e400, "data": [{"url": "u"}]}', "too large", id="overflow"),
    pytest.param(b'{"created": 1, "data": [{"url": "u"}], "seed": 1e999}', "too large", id="inf"),
    pytest.param(b'{"created": 1' + b"0" * 5000 + b', "data": []}', "digits", id="huge-int"),
    pytest.param(_nested(100_000), "nested too deeply", id="deep"),
    pytest.param(b"[" * 100_000, "nested too deeply", id="deep-truncated"),
    pytest.param(b'{"created": 1, "data": [{"url": "u"}', "not JSON", id="truncated"),
    pytest.param(b"", "not JSON", id="empty"),
    pytest.param(b"<html>502</html>", "not JSON", id="html"),
    pytest.param(b'{"created": 1, "data": [{"url": "\xff"}]}', "utf-8", id="not-utf8"),
    pytest.param('{"created": 1, "data": []}'.encode("utf-16"), "not JSON", id="utf-16"),
    pytest.param(b'{"created": 1, "data": [{"url": "\xed\xa0\x80"}]}', "utf-8", id="cesu"),
    pytest.param(b'{"created": true, "data": [{"url": "u"}]}', "created", id="bool-created"),
    pytest.param(b'{"created": [[[[[[1]]]]]], "data": [{"url": "u"}]}', "created", id="list"),
    pytest.param(b'{"created": 1, "data": {"url": "u"}}', "'data' list", id="data-object"),
    pytest.param(b'{"created": 1, "data": [null]}', "not an object", id="null-item"),
    pytest.param(b'{"created": 1, "data": [{"url": 5}]}', "neither", id="url-int"),
    pytest.param(b'"just a string"', "not a JSON object", id="string"),
    pytest.param(b"null", "not a JSON object", id="null"),
]


@pytest.mark.parametrize(("raw", "needle"), MALFORMED)
def test_every_malformed_2xx_is_typed(raw: bytes, needle: str) -> None:
    """Malformed 2xx bodies of any kind raise APIResponseValidationError, saying why."""
    with pytest.raises(APIResponseValidationError) as info:
        ImagesResponse.from_bytes(raw, request_id="req_1")
    assert needle in str(info.value)
    assert info.value.request_id == "req_1"
    assert len(str(info.value)) < 1000


def test_bom_and_float_created_are_accepted() -> None:
    """A UTF-8 BOM is skipped (RFC 8259 allows it) and a finite float timestamp is truncated."""
    response = ImagesResponse.from_bytes(b"\xef\xbb\xbf" + OK.replace(b"1700000000", b"1.5e9"))
    assert response.created == 1_500_000_000
    assert type(response.created) is int


def test_from_json_refuses_non_finite_created() -> None:
    """from_json (parsed elsewhere) refuses NaN and infinite timestamps too."""
    for created in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(APIResponseValidationError, match="created"):
            ImagesResponse.from_json({"created": created, "data": [{"url": "u"}]})


def test_large_malformed_body_is_kept_as_an_excerpt() -> None:
    """A multi-megabyte malformed 2xx keeps a 2,000-character excerpt, not the whole body."""
    big = b'{"created": 1, "data": [{"b64_json": 7}], "pad": "' + b"x" * 5_000_000 + b'"}'
    with pytest.raises(APIResponseValidationError) as info:
        ImagesResponse.from_bytes(big)
    assert isinstance(info.value.body, str)
    assert len(info.value.body) == MAX_BODY_EXCERPT
    small = b'{"created": 1, "data": []}'
    with pytest.raises(APIResponseValidationError) as info:
        ImagesResponse.from_bytes(small)
    assert info.value.body == {"created": 1, "data": []}


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_typed(raw: bytes) -> None:
    """Whatever bytes a 2xx carries: a response, or APIResponseValidationError."""
    with contextlib.suppress(APIResponseValidationError):
        ImagesResponse.from_bytes(raw)


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),  # NaN and infinities included
        st.text(st.characters(exclude_categories=()), max_size=10),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.text(max_size=6), inner, max_size=4),
        ),
        max_leaves=20,
    )


_RESPONSES = st.fixed_dictionaries(
    {"created": _json_values(), "data": _json_values()},
    optional={"extra": _json_values()},
) | st.fixed_dictionaries(
    {
        "created": st.integers(min_value=0, max_value=2**40),
        "data": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "url": _json_values(),
                    "b64_json": _json_values(),
                    "revised_prompt": _json_values(),
                },
            ),
            max_size=3,
        ),
    }
)


@FUZZ
@given(_RESPONSES, st.sampled_from([b"", b"garbage", b"]", b"\xff"]), st.integers(0, 80))
def test_json_shaped_bodies_parse_or_raise_typed(
    payload: dict[str, Any], tail: bytes, cut: int
) -> None:
    """Response-shaped JSON, with NaN, surrogates, wrong types, cut short or with junk."""
    raw = json.dumps(payload).encode("utf-8", "surrogatepass")
    for body in (raw, raw + tail, raw[: len(raw) - cut]):
        try:
            response = ImagesResponse.from_bytes(body)
        except APIResponseValidationError:
            continue
        assert type(response.created) is int
        assert response.data
        assert all(image.url is not None or image.b64_json is not None for image in response.data)


def test_parse_json_is_a_value_error_or_json() -> None:
    """parse_json: the one parser for untrusted JSON; every failure is a ValueError."""
    assert parse_json(b'{"a": [1, 2.5, "\xc3\xa9"]}') == {"a": [1, 2.5, "é"]}
    assert parse_json('{"a": 1}') == {"a": 1}
    for bad in (b"NaN", b"[1e400]", b"[" * 100_000, b"\xff", b"{", b"1 2"):
        with pytest.raises(ValueError):
            parse_json(bad)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@FUZZ
@given(
    st.dictionaries(st.text(max_size=4), _JSON_VALUES, max_size=3),
    st.sampled_from(["", " ", "\n", "\ufeff", "x"]),
    st.sampled_from(["", " ", "\r\n", "x", "{}", "]", '"']),
    st.integers(min_value=0, max_value=40),
)
def test_parse_json_answers_as_the_full_decoder_does(
    obj: dict[str, Any], before: str, after: str, cut: int
) -> None:
    """The object fast path (an answer that starts with "{") returns what the decoder
    returns, and fails where it fails with the same message: whole, cut short, with
    whitespace, a BOM or garbage before or after."""
    whole = before + json.dumps(obj) + after
    for text in (whole, whole[: len(whole) - cut]):
        reference = text[1:] if text.startswith("\ufeff") else text
        try:
            expected: object = json.JSONDecoder().decode(reference)
        except ValueError as exc:
            with pytest.raises(ValueError, match=re.escape(str(exc))):
                parse_json(text.encode())
        else:
            assert parse_json(text.encode()) == expected


@FUZZ
@given(st.binary(max_size=200) | st.text(st.characters(exclude_categories=()), max_size=50))
def test_parse_json_never_raises_anything_else(raw: bytes | str) -> None:
    """parse_json raises ValueError or returns JSON values, never NaN or infinity."""
    try:
        value = parse_json(raw)
    except ValueError:
        return
    json.dumps(value, allow_nan=False)


def test_error_body_bounds() -> None:
    """error_body keeps parsed JSON up to 64 KiB, else at most 2,000 characters of text."""
    assert error_body(b'{"error": {"message": "no"}}') == {"error": {"message": "no"}}
    big = json.dumps({"error": {"message": "x" * MAX_PARSED_BODY}}).encode()
    assert error_body(big) == big[:MAX_BODY_EXCERPT].decode()
    assert error_body(b"<html>hi</html>", expect_json=False) == "<html>hi</html>"
    assert error_body(b'{"x": NaN}') == '{"x": NaN}'
    assert error_body(b"\xff" * 10_000) == "\ufffd" * MAX_BODY_EXCERPT
    assert error_body("é".encode() * 5000) == "é" * MAX_BODY_EXCERPT


class _Boom:
    def __repr__(self) -> str:
        raise RuntimeError("repr failed")


def _deep_dict(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    root = node
    for _ in range(depth):
        node["a"] = {}
        node = node["a"]
    return root


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"error": {"message": "bad prompt"}}, "bad prompt"),
        ({"error": "quota"}, "quota"),
        ({"message": "m"}, "m"),
        ({"detail": "d"}, "d"),
        ({"error": {"message": "two\nlines\x1b[31m red"}}, "two lines [31m red"),
        ({"error": {"message": "   "}, "detail": "fallback"}, "fallback"),
        ([1, 2], "[1, 2]"),
        (3.5, "3.5"),
        (None, "HTTP 500 with an empty body"),
        ("", "HTTP 500 with an empty body"),
        ("<html><body><p></p></body></html>", "HTTP 500"),
        ("<title>502 &amp; Gateway</title>", "502 & Gateway"),
    ],
)
def test_message_from_body_shapes(body: object, expected: str) -> None:
    """The message is found in every common shape, on one line."""
    assert _message_from_body(500, body) == expected


@pytest.mark.parametrize(
    "body",
    [
        _deep_dict(100_000),
        {"error": _deep_dict(100_000)},
        {"error": {"message": "x" * 1_000_000}},
        {"error": {"message": 5, "code": [1] * 10_000}},
        _Boom(),
        {"error": _Boom()},
        "<title>" * 50_000,
        "x" * 1_000_000,
        {1: 2, None: [3]},
    ],
    ids=["deep", "deep-error", "long", "odd", "boom", "boom-inside", "titles", "text", "keys"],
)
def test_message_from_body_is_safe_and_short(body: object) -> None:
    """No body shape makes building an error raise, and the message stays short."""
    message = _message_from_body(503, body)
    assert 0 < len(message) <= 300
    assert "\n" not in message
    exc = error_for_status(503, body)
    assert isinstance(exc, InternalServerError)
    assert len(str(exc)) <= 320


@pytest.fixture
def local_client() -> FluxClient:
    """A client that is never used to send anything (no session is made)."""
    return FluxClient(api_key="sk-test", base_url="http://127.0.0.1:9/v1")


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b'{"error": {"message": "x"}, "n": NaN}', "application/json"),
        (b'{"error": ' + b"[" * 100_000, "application/json"),
        (_nested(100_000), "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b'{"created": 1e400}', "text/plain"),
        (b"<html>" + b"x" * 10_000_000 + b"</html>", "text/html"),
        (b'{"error": {"message": "' + b"y" * 200_000 + b'"}}', "application/json"),
        (b"", ""),
    ],
    ids=["nan", "deep-truncated", "deep", "bad-utf8", "inf", "huge-html", "huge-json", "empty"],
)
def test_status_error_never_raises_and_is_bounded(
    local_client: FluxClient, raw: bytes, content_type: str
) -> None:
    """The client's status errors: a typed error from any body, at most a bounded excerpt."""
    error = local_client._context.status_error(502, raw, {"Content-Type": content_type}, "req_2")
    assert isinstance(error, InternalServerError)
    assert error.request_id == "req_2"
    assert len(str(error)) <= 320
    if isinstance(error.body, str):
        assert len(error.body) <= MAX_BODY_EXCERPT
    else:
        assert len(raw) <= MAX_PARSED_BODY


def test_status_error_keeps_small_json_parsed(local_client: FluxClient) -> None:
    """A small JSON error body is kept parsed; the message comes from it."""
    raw = b'{"error": {"message": "slow down", "type": "rate_limit"}}'
    error = local_client._context.status_error(
        429,
        raw,
        CIMultiDict({"Content-Type": "Application/JSON; charset=utf-8", "Retry-After": "2"}),
        None,
    )
    assert isinstance(error, RateLimitError)
    assert error.body == {"error": {"message": "slow down", "type": "rate_limit"}}
    assert str(error) == "Error code: 429 - slow down"
    assert error.retry_after == 2


@FUZZ
@given(
    st.integers(400, 599),
    st.binary(max_size=300) | _RESPONSES.map(lambda p: json.dumps(p).encode("utf-8", "replace")),
    st.sampled_from(["application/json", "text/html", "", "application/problem+json"]),
)
def test_status_error_fuzz(status: int, raw: bytes, content_type: str) -> None:
    """Any status and body give an APIStatusError with a short message and bounded body."""
    client = FluxClient(base_url="http://127.0.0.1:9/v1")
    error = client._context.status_error(status, raw, {"Content-Type": content_type}, None)
    assert isinstance(error, APIStatusError)
    assert error.status_code == status
    assert len(str(error)) <= 320
    if isinstance(error.body, str):
        assert len(error.body) <= MAX_BODY_EXCERPT

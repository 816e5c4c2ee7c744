"""An images body parsed with its base64 images lifted out answers as the whole parse."""

from __future__ import annotations

import base64
import json
import random
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_async import ImagesResponse, _images_json
from flux_async._exceptions import parse_json
from flux_async._images_json import (
    LIFTED_BYTES,
    SEARCHED_BYTES,
    SKIPPED_KEYS,
    parse_images_body,
)

FUZZ = settings(max_examples=150, deadline=None, database=None)


def _b64(size: int, seed: int = 0) -> str:
    return base64.b64encode(random.Random(seed).randbytes(size)).decode()


IMAGE = _b64(18_000)  # 24 KB of base64: lifted
SMALL = _b64(600)  # below LIFTED_BYTES: read by the scanner


def _body(*items: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"created": 1700000000, "data": list(items), **extra}).encode()


def _same_as_whole(raw: bytes) -> None:
    """parse_images_body(raw) returns what parse_json(raw) returns, or raises its error."""
    try:
        expected = parse_json(raw)
    except ValueError as exc:
        with pytest.raises(ValueError, match=re.escape(str(exc))):
            parse_images_body(raw)
    else:
        assert parse_images_body(raw) == expected


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of each body the lifting parse hands to parse_json."""
    parsed: list[int] = []

    def spy(raw: bytes) -> Any:
        parsed.append(len(raw))
        return parse_json(raw)

    monkeypatch.setattr(_images_json, "parse_json", spy)
    return parsed


BODIES = [
    pytest.param(_body({"b64_json": IMAGE}), id="one"),
    pytest.param(_body({"b64_json": IMAGE, "revised_prompt": "a fox"}), id="revised-after"),
    pytest.param(
        _body({"revised_prompt": 'a "fox"\n\u00e9\u2603', "b64_json": IMAGE}), id="escapes-before"
    ),
    pytest.param(_body(*({"b64_json": _b64(9_000, i)} for i in range(3))), id="three"),
    pytest.param(_body({"b64_json": IMAGE}, {"b64_json": SMALL}, {"url": "u"}), id="mixed"),
    pytest.param(
        b'{ "created" : 1 ,\n "data" : [ { "b64_json"\t:\r\n "' + IMAGE.encode() + b'" } ] }',
        id="whitespace",
    ),
    pytest.param(b"\xef\xbb\xbf" + _body({"b64_json": IMAGE}), id="bom"),
    pytest.param(_body({"b64_json": IMAGE}, seed=1.5), id="float-extra"),
]


@pytest.mark.parametrize("raw", BODIES)
def test_a_lifted_body_parses_as_the_whole_one(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The common answers: the images are lifted out (the scanner reads a body of a few
    hundred bytes, once) and the value is the whole parse's."""
    expected = parse_json(raw)
    parsed = _spy(monkeypatch)
    assert parse_images_body(raw) == expected
    assert len(parsed) == 1
    assert parsed[0] < 1024
    assert ImagesResponse.from_bytes(raw) == ImagesResponse.from_json(expected)


IMAGE_ESCAPED = json.dumps(IMAGE).replace("/", "\\/")[1:-1]

IMAGE_BYTES = IMAGE.encode()
REVERSED = IMAGE[::-1].encode()  # base64 too: another image of the same length


def _item(fields: bytes) -> bytes:
    """A body of one image item written by hand: ``fields`` inside its braces."""
    return b'{"created": 1, "data": [{' + fields + b"}]}"


IN_DOUBT = [
    # The image's text holds an escape (a JSON encoder that escapes '/').
    pytest.param(_item(b'"b64_json": "%s"' % IMAGE_ESCAPED.encode()), id="escaped-slash"),
    # Not padded right: JSON, but not base64.
    pytest.param(_body({"b64_json": IMAGE[:-1]}), id="bad-padding"),
    pytest.param(_body({"b64_json": IMAGE[:5000] + " " + IMAGE[5000:]}), id="space-inside"),
    # A key of that name outside the images.
    pytest.param(_body({"url": "u", "meta": {"b64_json": IMAGE}}), id="nested"),
    pytest.param(_body({"url": "u"}, b64_json=IMAGE), id="top-level"),
    # The server's own U+0000, even one that looks like a placeholder.
    pytest.param(_body({"b64_json": "\u00000"}, {"b64_json": IMAGE}), id="placeholder-double"),
    pytest.param(_body({"b64_json": IMAGE}, {"b64_json": "\u00001"}), id="placeholder-next"),
    pytest.param(
        _body({"b64_json": "\u00000", "meta": {"b64_json": IMAGE}}), id="placeholder-in-place"
    ),
    pytest.param(_body({"b64_json": IMAGE, "revised_prompt": "a\u0000"}), id="nul"),
    # A key twice in one item: the last one counts.
    pytest.param(
        _item(b'"b64_json": "%s", "b64_json": "%s"' % (IMAGE_BYTES, REVERSED)), id="duplicate-key"
    ),
    # A longer key that ends with the name ("x\"b64_json"), beside an image and alone.
    pytest.param(
        _item(b'"b64_json": "%s", "x\\"b64_json": "%s"' % (IMAGE_BYTES, REVERSED)),
        id="longer-key-beside",
    ),
    pytest.param(_item(b'"url": "u", "x\\"b64_json": "%s"' % IMAGE_BYTES), id="longer-key"),
    # The name as a value, then as a key.
    pytest.param(_body({"url": "b64_json", "b64_json": IMAGE}), id="name-as-value"),
    # Broken bodies: each fails with the whole parse's message.
    pytest.param(_body({"b64_json": IMAGE})[:-3], id="cut-after"),
    pytest.param(_body({"b64_json": IMAGE})[:20_000], id="cut-inside"),
    pytest.param(_body({"b64_json": IMAGE}) + b" x", id="trailing-garbage"),
    pytest.param(_body({"b64_json": IMAGE, "revised_prompt": "\xff"}), id="non-ascii-escaped"),
    pytest.param(_body({"b64_json": IMAGE}) + b"\xff", id="not-utf8-after"),
    pytest.param(_body({"b64_json": IMAGE}).replace(b"1700000000", b"NaN"), id="nan-created"),
    pytest.param(
        _item(b'"b64_json": "%s\n%s"' % (IMAGE_BYTES[:9000], IMAGE_BYTES[9000:])),
        id="control-character",
    ),
    pytest.param(_item(b'"b64_json": "' + IMAGE_BYTES)[: -len(b"}]}")], id="unterminated"),
]


@pytest.mark.parametrize("raw", IN_DOUBT)
def test_a_body_in_doubt_parses_as_the_whole_one(raw: bytes) -> None:
    """Escapes, keys of that name elsewhere, the server's own U+0000, a repeated key,
    broken bodies: the same value, or the same error, as the whole parse."""
    _same_as_whole(raw)


def test_short_bodies_and_short_images_are_not_searched(monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer of URLs, or one image too small to be worth it, is read whole."""
    parsed = _spy(monkeypatch)
    short = _body({"b64_json": _b64(SEARCHED_BYTES // 2)})
    assert len(short) < SEARCHED_BYTES
    many_small = _body(*({"b64_json": _b64(LIFTED_BYTES // 2, i)} for i in range(40)))
    assert len(many_small) > SEARCHED_BYTES
    for raw in (short, many_small):
        assert parse_images_body(raw) == parse_json(raw)
    assert parsed == [len(short), len(many_small)]


def test_long_runs_of_spaces_around_the_key_are_read_as_the_scanner_reads_them() -> None:
    """Spaces before and after the ':' (a server's indentation, or 200 KB of it)."""
    for run in (b" ", b"\n\t", b" " * 100_000):
        raw = b'{"created": 1, "data": [{"b64_json"' + run + b":" + run + b'"'
        _same_as_whole(raw + IMAGE.encode() + b'"}]}')
        _same_as_whole(raw + IMAGE.encode() + b"x" + run)


def test_past_a_few_other_matches_the_body_is_parsed_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Matches of the name that are not a long image cost a search each: past
    SKIPPED_KEYS of them the body goes to the scanner whole (an answer holds a few
    images, not thousands of keys of that name)."""
    parsed = _spy(monkeypatch)
    small = [{"b64_json": "AAAA"}] * SKIPPED_KEYS
    within = _body(*small, {"b64_json": IMAGE})
    beyond = _body(*small, {"url": "b64_json"}, {"b64_json": IMAGE})
    assert parse_images_body(within) == parse_json(within)
    assert parsed[-1] < 2048
    assert parse_images_body(beyond) == parse_json(beyond)
    assert parsed[-1] == len(beyond)


def test_without_pybase64_the_check_is_the_standard_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where pybase64 is not installed the images are still lifted, and one with a
    character base64 does not have is not."""
    monkeypatch.setattr(_images_json, "simd_b64decode", lambda: None)
    parsed = _spy(monkeypatch)
    raw = _body({"b64_json": IMAGE})
    assert parse_images_body(raw) == parse_json(raw)
    assert parsed[-1] < 1024
    broken = _body({"b64_json": IMAGE[:100] + "*" + IMAGE[100:]})
    assert parse_images_body(broken) == parse_json(broken)
    assert parsed[-1] == len(broken)


@FUZZ
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=12_000), min_size=1, max_size=4),
    revised=st.text(max_size=20),
    separators=st.sampled_from([(",", ":"), (", ", ": "), (",\n", " :\t")]),
    ensure_ascii=st.booleans(),
    mutation=st.sampled_from(["none", "cut", "escape", "byte"]),
    where=st.floats(min_value=0, max_value=1),
)
def test_any_images_body_parses_as_the_whole_one(
    sizes: list[int],
    revised: str,
    separators: tuple[str, str],
    ensure_ascii: bool,
    mutation: str,
    where: float,
) -> None:
    """Bodies of 1-4 images of any size, with any prompt, spacing and encoding, whole or
    cut short, with an escape or a stray byte put anywhere: the same value, or the same
    error, as the whole parse."""
    items = [{"b64_json": _b64(size, i), "revised_prompt": revised} for i, size in enumerate(sizes)]
    raw = json.dumps(
        {"created": 1, "data": items}, separators=separators, ensure_ascii=ensure_ascii
    ).encode()
    at = int(where * len(raw))
    if mutation == "cut":
        raw = raw[:at]
    elif mutation == "escape":
        raw = raw[:at] + b"\\/" + raw[at:]
    elif mutation == "byte":
        raw = raw[:at] + b'"' + raw[at:]
    _same_as_whole(raw)

"""ImageRequest validation and ImagesResponse parsing."""

from __future__ import annotations

import base64
import json

import pytest

from flux_async import (
    APIResponseValidationError,
    Image,
    ImageRequest,
    ImagesResponse,
    ValidationError,
)


def test_defaults_send_aspect_ratio_and_model() -> None:
    """A bare request sends the contract's required aspect_ratio (1:1) and the default model."""
    assert ImageRequest(prompt="a cat").to_json() == {
        "prompt": "a cat",
        "model": "flux-kontext-pro",
        "n": 1,
        "aspect_ratio": "1:1",
    }


def test_none_omits_fields() -> None:
    """aspect_ratio=None omits it (for plain OpenAI servers); unset optional fields are not sent."""
    body = ImageRequest(prompt="x", aspect_ratio=None).to_json()
    assert "aspect_ratio" not in body
    assert set(body) == {"prompt", "model", "n"}


def test_every_field_is_sent() -> None:
    """Every contract field and extra_body keys reach the JSON body unchanged."""
    req = ImageRequest(
        prompt="p",
        model="dall-e-3",
        n=2,
        aspect_ratio="16:9",
        size="1024x1792",
        quality="hd",
        response_format="b64_json",
        style="natural",
        user="u-1",
        extra_body={"seed": 7},
    )
    assert req.to_json() == {
        "prompt": "p",
        "model": "dall-e-3",
        "n": 2,
        "aspect_ratio": "16:9",
        "size": "1024x1792",
        "quality": "hd",
        "response_format": "b64_json",
        "style": "natural",
        "user": "u-1",
        "seed": 7,
    }


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("prompt", "", "non-empty"),
        ("prompt", "   ", "non-empty"),
        ("prompt", "x" * 1001, "at most 1000"),
        ("prompt", 5, "string"),
        ("n", 0, "1 to 1000"),
        ("n", True, "integer"),
        ("n", 1.0, "integer"),
        ("aspect_ratio", "5:4", "16:9"),
        ("size", "big", "WIDTHxHEIGHT"),
        ("size", "1024*1024", "WIDTHxHEIGHT"),
        ("quality", "ultra", "standard, hd"),
        ("response_format", "png", "url, b64_json"),
        ("style", "pop", "vivid, natural"),
        ("user", 3, "string"),
        ("model", "", "non-empty"),
        ("extra_body", ["seed"], "mapping"),
    ],
)
def test_validation_names_field_value_and_allowed(field: str, value: object, needle: str) -> None:
    """A bad field raises ValidationError (a ValueError) naming field, value and what is allowed."""
    kwargs: dict[str, object] = {"prompt": "ok", field: value}
    with pytest.raises(ValidationError) as info:
        ImageRequest(**kwargs)  # type: ignore[arg-type]
    exc = info.value
    assert isinstance(exc, ValueError)
    assert exc.field == field
    assert exc.value == value
    assert needle in str(exc)
    assert str(exc).startswith(f"{field}=")


def test_extra_body_cannot_shadow_a_field() -> None:
    """A contract field hidden in extra_body is refused rather than silently overriding it."""
    with pytest.raises(ValidationError, match="pass n directly"):
        ImageRequest(prompt="x", extra_body={"n": 3})


def test_extra_body_is_copied() -> None:
    """Mutating the caller's dict after building does not change the request."""
    extra = {"seed": 1}
    req = ImageRequest(prompt="x", extra_body=extra)
    extra["seed"] = 2
    assert req.to_json()["seed"] == 1


def test_chunks_split_n_by_ten() -> None:
    """n above 10 is split into requests of at most 10, in order."""
    assert ImageRequest(prompt="x", n=23).chunks() == [10, 10, 3]
    assert ImageRequest(prompt="x", n=20).chunks() == [10, 10]
    assert ImageRequest(prompt="x", n=1).chunks() == [1]


def test_response_keeps_unknown_keys() -> None:
    """Parsing keeps revised_prompt, b64_json and keys we do not model."""
    payload = {
        "created": 5,
        "usage": {"images": 1},
        "data": [{"url": "https://a/1.png", "revised_prompt": "rp", "seed": 9}],
    }
    resp = ImagesResponse.from_json(payload, request_id="req_1")
    assert resp.created == 5
    assert resp.request_id == "req_1"
    assert resp.extra == {"usage": {"images": 1}}
    assert resp.data[0] == Image(url="https://a/1.png", revised_prompt="rp", extra={"seed": 9})
    assert resp.urls == ["https://a/1.png"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"<html>oops</html>", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"created": 1}', "no 'data' list"),
        (b'{"created": 1, "data": []}', "empty"),
        (b'{"created": 1, "data": [{}]}', "neither"),
        (b'{"created": 1, "data": ["x"]}', "not an object"),
        (b'{"created": "now", "data": [{"url": "u"}]}', "created"),
        (b'{"data": [{"url": "u"}]}', "created"),
    ],
)
def test_malformed_2xx_is_an_error(raw: bytes, needle: str) -> None:
    """A 2xx with an unusable body raises APIResponseValidationError, never a success."""
    with pytest.raises(APIResponseValidationError, match=needle):
        ImagesResponse.from_bytes(raw)


def test_decode_b64() -> None:
    """Image.decode returns the b64_json bytes, and explains itself for URL images."""
    data = base64.b64encode(b"\x89PNG").decode()
    assert Image(b64_json=data).decode() == b"\x89PNG"
    with pytest.raises(ValueError, match="response_format='b64_json'"):
        Image(url="u").decode()


def test_join_keeps_order() -> None:
    """Joining split responses keeps the images in chunk order."""
    a = ImagesResponse.from_json({"created": 1, "data": [{"url": "a"}, {"url": "b"}]})
    b = ImagesResponse.from_json({"created": 2, "data": [{"url": "c"}]})
    assert ImagesResponse.join([a, b]).urls == ["a", "b", "c"]


@pytest.mark.parametrize(
    "req",
    [
        ImageRequest(prompt='say "hi" — ünïcode\n'),
        ImageRequest(prompt="x", n=7, aspect_ratio=None, size="512x512", style="vivid"),
        ImageRequest(prompt="x", quality="hd", response_format="b64_json", user="u"),
        ImageRequest(prompt="x", extra_body={"seed": 3}),
    ],
)
def test_to_bytes_is_the_json_body(req: ImageRequest) -> None:
    """to_bytes (what is sent) is exactly to_json, encoded; n overrides per chunk."""
    assert json.loads(req.to_bytes()) == req.to_json()
    assert list(json.loads(req.to_bytes())) == list(req.to_json())
    assert json.loads(req.to_bytes(3))["n"] == 3

"""ImageRequest validation and ImagesResponse parsing."""

from __future__ import annotations

import base64
import json
import typing
from typing import Any

import attrs
import pytest

from flux_async import (
    APIResponseValidationError,
    FluxClient,
    Image,
    ImageRequest,
    ImagesResponse,
    RequestFields,
    ValidationError,
)
from flux_async._models import FIELD_SPECS
from flux_async.emulator._validation import Invalid, validate


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
        aspect_ratio="9:16",
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
        "aspect_ratio": "9:16",
        "size": "1024x1792",
        "quality": "hd",
        "response_format": "b64_json",
        "style": "natural",
        "user": "u-1",
        "seed": 7,
    }
    body_fields = [name for name, spec in FIELD_SPECS.items() if not spec.in_prompt]
    assert list(req.to_json()) == ["prompt", *body_fields, "seed"]


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


_UNSET = object()  # "not passed" in the table below


@pytest.mark.parametrize(
    ("aspect_ratio", "size", "sent"),
    [
        (_UNSET, None, "1:1"),  # neither given: the default
        (_UNSET, "1792x1024", "16:9"),  # 1.75 is 16:9 within 3 %
        (_UNSET, "1024x1792", "9:16"),
        (_UNSET, "512x512", "1:1"),
        (_UNSET, "1024x1524", "2:3"),  # the contract's commented-out example
        (None, "1000x300", None),  # no ratio fits: only with None, the size alone
        ("16:9", "1792x1024", "16:9"),  # both given and agreeing
        ("1:1", "1024x1024", "1:1"),
        (None, "1792x1024", None),  # None still means "omit it"
        (None, None, None),
        ("21:9", None, "21:9"),
    ],
)
def test_aspect_ratio_follows_size_unless_given(
    aspect_ratio: object, size: str | None, sent: str | None
) -> None:
    """The 1:1 default applies only without a size; a size sends its own ratio, if any."""
    kwargs: dict[str, Any] = {"prompt": "x", "size": size}
    if aspect_ratio is not _UNSET:
        kwargs["aspect_ratio"] = aspect_ratio
    req = ImageRequest(**kwargs)
    assert req.aspect_ratio == sent
    body = req.to_json()
    assert body.get("aspect_ratio") == sent
    assert ("aspect_ratio" in body) == (sent is not None)
    assert body.get("size") == size
    assert json.loads(req.to_bytes()) == body
    assert list(json.loads(req.to_bytes())) == list(body)


def test_a_size_with_none_of_the_ratios_needs_aspect_ratio_none() -> None:
    """The API requires aspect_ratio: a size implying none of the nine, without one, is
    refused before sending, saying what to pass."""
    with pytest.raises(ValidationError) as info:
        ImageRequest(prompt="x", size="1000x300")
    assert info.value.field == "size"
    assert info.value.value == "1000x300"
    assert "21:9, 16:9, 4:3, 3:2, 1:1, 2:3, 3:4, 9:16, 9:21" in str(info.value)
    assert "aspect_ratio=None" in str(info.value)
    base = ImageRequest(prompt="x")
    with pytest.raises(ValidationError, match="size='1000x300'"):
        attrs.evolve(base, size="1000x300")


@pytest.mark.parametrize(
    ("aspect_ratio", "size", "needle"),
    [
        ("1:1", "1792x1024", "the ratio of size='1792x1024', '16:9'"),
        ("16:9", "1024x1792", "'9:16'"),
        ("4:3", "1024x1024", "'1:1'"),
        ("21:9", "1000x300", "none of the nine ratios"),
    ],
)
def test_size_and_aspect_ratio_that_disagree_are_refused(
    aspect_ratio: str, size: str, needle: str
) -> None:
    """A request whose size contradicts its ratio is a ValidationError, never sent."""
    with pytest.raises(ValidationError) as info:
        ImageRequest(prompt="x", aspect_ratio=aspect_ratio, size=size)
    assert info.value.field == "aspect_ratio"
    assert info.value.value == aspect_ratio
    assert needle in str(info.value)


def test_the_batch_hot_path_resolves_the_ratio() -> None:
    """ImageRequest(prompt=item, **fields), as the fan-out builds each prompt, follows size."""
    fields: RequestFields = {"size": "1792x1024", "n": 2}
    assert ImageRequest(prompt="x", **fields).to_json()["aspect_ratio"] == "16:9"
    fields = {"aspect_ratio": "16:9"}
    assert ImageRequest(prompt="x", **fields).to_json()["aspect_ratio"] == "16:9"


def test_build_request_over_a_request_follows_a_new_size() -> None:
    """Fields applied over an ImageRequest: a defaulted ratio follows the new size; a ratio
    the caller gave is kept, and contradicting it is refused."""
    client = FluxClient(base_url="http://127.0.0.1:9/v1", api_key="sk-test")
    wide = client.build_request(ImageRequest(prompt="x"), {"size": "1792x1024"})
    assert (wide.aspect_ratio, wide.size) == ("16:9", "1792x1024")
    square = client.build_request(wide, {"size": "1024x1024"})
    assert square.aspect_ratio == "1:1"
    assert client.build_request(wide, {"n": 3}).aspect_ratio == "16:9"
    with pytest.raises(ValidationError, match="aspect_ratio='1:1'"):
        client.build_request(ImageRequest(prompt="x", aspect_ratio="1:1"), {"size": "1792x1024"})


def test_field_specs_are_the_request_fields() -> None:
    """FIELD_SPECS (the one definition) lists every ImageRequest field after prompt, in body
    order, and RequestFields (kept literal for type checkers) has exactly those plus
    extra_body, with the same types: adding a field in one place and not the other fails."""
    declared = [a.name for a in attrs.fields(ImageRequest) if a.init]
    assert declared == ["prompt", *FIELD_SPECS, "extra_body"]
    hints = typing.get_type_hints(RequestFields)
    assert set(hints) == {*FIELD_SPECS, "extra_body"}
    own = typing.get_type_hints(ImageRequest)
    for name in FIELD_SPECS:
        assert hints[name] == own[name], name


@pytest.mark.parametrize(
    "name", [name for name, spec in FIELD_SPECS.items() if spec.choices is not None]
)
def test_choices_are_checked_alike_by_client_and_emulator(name: str) -> None:
    """Each allowed value is sent by the client and accepted by the emulator; any other
    value is refused by both, naming the field."""
    choices = FIELD_SPECS[name].choices
    assert choices
    for value in choices:
        body = ImageRequest(prompt="x", **{name: value}).to_json()
        assert body[name] == value
        validate(body, require_aspect_ratio=True)
    with pytest.raises(ValidationError) as info:
        ImageRequest(prompt="x", **{name: "bogus"})
    assert info.value.field == name
    assert ", ".join(choices) in str(info.value)
    with pytest.raises(Invalid) as refused:
        validate({"prompt": "x", "aspect_ratio": "1:1", name: "bogus"}, require_aspect_ratio=True)
    assert refused.value.param == name
    assert refused.value.code == "invalid_value"


@pytest.mark.parametrize("name", [name for name, spec in FIELD_SPECS.items() if not spec.in_prompt])
def test_emulator_refuses_a_non_string_for_every_string_field(name: str) -> None:
    """The emulator's type checks cover every field the library declares."""
    with pytest.raises(Invalid) as refused:
        validate({"prompt": "x", "aspect_ratio": "1:1", name: [1]}, require_aspect_ratio=True)
    assert refused.value.param == name
    assert refused.value.code == "invalid_type"


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

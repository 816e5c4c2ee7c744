"""Validation is complete before anything is sent: requests, timeouts, call and batch settings."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_async import (
    FluxClient,
    ImageRequest,
    RateLimiter,
    Timeout,
    ValidationError,
)
from flux_async.emulator import Emulator

FUZZ = settings(max_examples=300, deadline=None, database=None)

# -- strings that cannot be sent ------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "user", "model"])
@pytest.mark.parametrize("text", ["\ud800", "a cat \udfff", "x\udcff y"])
def test_lone_surrogates_are_refused(field: str, text: str) -> None:
    """A string that is not valid Unicode fails validation, naming the field."""
    kwargs: dict[str, Any] = {"prompt": "ok", field: text}
    with pytest.raises(ValidationError, match="lone surrogate") as info:
        ImageRequest(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}=")


def test_non_ascii_text_is_fine() -> None:
    """Valid Unicode outside ASCII (accents, CJK, emoji) is sent as UTF-8."""
    req = ImageRequest(prompt="un café — 猫 🐈", user="ü", model="模型")
    assert json.loads(req.to_bytes())["prompt"] == "un café — 猫 🐈"


# -- extra_body -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "key", "needle"),
    [
        ({"seed": math.nan}, "seed", "NaN or Infinity"),
        ({"seed": math.inf}, "seed", "NaN or Infinity"),
        ({"opts": {"weights": [1.0, -math.inf]}}, "opts", "NaN or Infinity"),
        ({"tags": {"a", "b"}}, "tags", "set is not JSON serializable"),
        ({"raw": b"bytes"}, "raw", "bytes is not JSON serializable"),
        ({"obj": object()}, "obj", "not JSON serializable"),
        ({"text": "bad \ud800"}, "text", "lone surrogate"),
        ({"\udc80key": 1}, "\udc80key", "lone surrogate"),
        ({"nested": {(1, 2): "tuple key"}}, "nested", "keys must be"),
    ],
)
def test_extra_body_must_be_json(extra: dict[Any, Any], key: str, needle: str) -> None:
    """extra_body values JSON cannot carry are refused when the request is built."""
    with pytest.raises(ValidationError) as info:
        ImageRequest(prompt="x", extra_body=extra)
    exc = info.value
    assert exc.field == "extra_body"
    assert repr(key) in exc.allowed
    assert needle in str(exc)


def test_extra_body_keys_must_be_strings() -> None:
    """A non-string top-level key would be sent as a different key: refused."""
    with pytest.raises(ValidationError, match="string keys"):
        ImageRequest(prompt="x", extra_body={1: "one"})  # type: ignore[dict-item]


def test_extra_body_circular_and_deep() -> None:
    """A circular or absurdly deep extra_body is a ValidationError, not a crash."""
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValidationError, match="Circular"):
        ImageRequest(prompt="x", extra_body={"loop": loop})
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValidationError, match="nested too deeply") as info:
        ImageRequest(prompt="x", extra_body={"deep": deep})
    assert len(str(info.value)) < 300


def test_extra_body_is_sent_as_validated() -> None:
    """The body sent is what was checked: mutating a nested value afterwards changes nothing."""
    options = {"steps": 4}
    req = ImageRequest(prompt="x", extra_body={"options": options, "seed": 1.5})
    options["steps"] = math.nan
    sent = json.loads(req.to_bytes())
    assert sent["options"] == {"steps": 4}
    assert sent["seed"] == 1.5
    assert list(sent) == ["prompt", "model", "n", "aspect_ratio", "options", "seed"]
    assert json.loads(req.to_bytes(3))["n"] == 3


def test_build_request_checks_extra_body(emulator: Emulator) -> None:
    """A batch-wide extra_body with NaN is refused once, by build_request, naming the key."""
    client = FluxClient(base_url=emulator.base_url)
    with pytest.raises(ValidationError, match="'seed'"):
        client.build_request("x", {"extra_body": {"seed": math.nan}})


@pytest.mark.parametrize("user", ["", "   ", "\t"])
def test_blank_user_is_refused(user: str) -> None:
    """A blank user (an unset variable, most likely) is refused naming the field, as a
    blank model is; None omits it."""
    with pytest.raises(ValidationError) as info:
        ImageRequest(prompt="x", user=user)
    assert info.value.field == "user"
    assert info.value.value == user
    assert "non-empty string, or None to omit it" in str(info.value)
    assert "user" not in json.loads(ImageRequest(prompt="x", user=None).to_bytes())


# -- property tests: either ValidationError or a body that round-trips ----------------

_ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=30)


@FUZZ
@given(prompt=_ANY_TEXT, user=st.none() | _ANY_TEXT, model=_ANY_TEXT)
def test_strings_validate_or_round_trip(prompt: str, user: str | None, model: str) -> None:
    """Any strings: ValidationError, or a UTF-8 body that decodes back to the same strings."""
    try:
        req = ImageRequest(prompt=prompt, user=user, model=model)
    except ValidationError as exc:
        field = exc.field
    else:
        field = ""
    if field:
        assert field in {"prompt", "user", "model"}
        return
    body = json.loads(req.to_bytes().decode("utf-8"))
    assert body["prompt"] == prompt
    assert body["model"] == model
    assert body.get("user") == user


def _reject(name: str) -> Any:
    raise AssertionError(f"{name} on the wire")


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN, infinities and -0.0 included
    _ANY_TEXT,
    st.binary(max_size=4),
    st.just(object()),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.frozensets(st.integers(), max_size=2),
        st.dictionaries(st.one_of(_ANY_TEXT, st.integers(), st.none()), inner, max_size=3),
    ),
    max_leaves=12,
)
_EXTRA = st.dictionaries(
    st.one_of(_ANY_TEXT, st.sampled_from(["n", "seed", "prompt"]), st.integers()),
    _VALUES,
    max_size=4,
)


def _sendable(extra: dict[Any, Any]) -> bool:
    """What the validation should accept, worked out independently."""
    if any(type(key) is not str or key in _FIELDS for key in extra):
        return False
    try:
        json.dumps(extra, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError):
        return False
    return True


_FIELDS = {
    "prompt",
    "model",
    "n",
    "aspect_ratio",
    "size",
    "quality",
    "response_format",
    "style",
    "user",
}


@FUZZ
@given(extra=_EXTRA, n=st.integers(1, 10))
def test_extra_body_validates_or_round_trips(extra: dict[Any, Any], n: int) -> None:
    """Any extra_body: ValidationError exactly when JSON cannot carry it, else a body
    that json.loads round-trips, with no NaN or Infinity."""
    try:
        req = ImageRequest(prompt="p", extra_body=extra)
    except ValidationError as exc:
        field = exc.field
    else:
        field = ""
    if field:
        assert field == "extra_body"
        assert not _sendable(extra)
        return
    assert _sendable(extra)
    for size in (None, n):
        body = json.loads(req.to_bytes(size).decode("utf-8"), parse_constant=_reject)
        expected = json.loads(json.dumps(req.to_json(size)))
        assert body == expected
        assert list(body) == list(expected)


# -- Timeout --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [0, -1, math.inf, math.nan, -math.inf, True, False, "5", 10**400, [5]],
)
@pytest.mark.parametrize("field", ["connect", "total"])
def test_timeout_refuses_bad_seconds(field: str, value: object) -> None:
    """connect/total must be finite seconds > 0 or None: ValidationError, a ValueError."""
    with pytest.raises(ValidationError, match=f"^{field}=.*finite number of seconds") as info:
        Timeout(**{field: value})  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert info.value.field == field


def test_timeout_accepts_numbers_and_none() -> None:
    """Ints, floats and None are fine and reach aiohttp as they are."""
    timeout = Timeout(connect=None, total=2)
    assert aiohttp.ClientTimeout(total=timeout.total, connect=timeout.connect).total == 2
    assert Timeout(connect=0.5, total=None).connect == 0.5


@FUZZ
@given(
    st.one_of(st.none(), st.floats(), st.integers(-5, 10**20), st.booleans(), st.text(max_size=3))
)
def test_timeout_fuzz(value: object) -> None:
    """Every value is either refused with ValidationError or a usable aiohttp timeout."""
    try:
        timeout = Timeout(total=value)  # type: ignore[arg-type]
    except ValidationError:
        assert value is not None
        return
    assert value is None or (
        type(value) in (int, float) and math.isfinite(value) and value > 0  # type: ignore[arg-type]
    )
    aiohttp.ClientTimeout(total=timeout.total, connect=timeout.connect)


# -- settings of a call or a batch ----------------------------------------------------


async def test_generate_refuses_a_bare_number_timeout(emulator: Emulator) -> None:
    """generate(timeout=5) says to pass Timeout(total=5), and sends nothing."""
    async with FluxClient(base_url=emulator.base_url) as client:
        with pytest.raises(ValidationError, match=r"pass Timeout\(total=5\)") as info:
            await client.generate("x", timeout=5)  # type: ignore[arg-type]
        assert info.value.field == "timeout"
        with pytest.raises(ValidationError, match="timeout"):
            await client.generate("x", timeout="30")  # type: ignore[arg-type]
    assert emulator.stats.requests == 0


async def test_generate_refuses_a_bad_idempotency_key(emulator: Emulator) -> None:
    """An idempotency key that cannot be a header value is refused before sending."""
    async with FluxClient(base_url=emulator.base_url) as client:
        for key in ("", "a\r\nX-Injected: 1", 5):
            with pytest.raises(ValidationError, match="idempotency_key"):
                await client.generate("x", idempotency_key=key)  # type: ignore[arg-type]
    assert emulator.stats.requests == 0


def test_client_timeout_must_be_a_timeout() -> None:
    """FluxClient(timeout=30) is refused with the same hint."""
    with pytest.raises(ValidationError, match=r"pass Timeout\(total=30\)"):
        FluxClient(base_url="http://127.0.0.1:9/v1", timeout=30)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field", "needle"),
    [
        ({"timeout": 5}, "timeout", r"pass Timeout\(total=5\)"),
        ({"deadline": 0}, "deadline", "finite number of seconds"),
        ({"deadline": math.inf}, "deadline", "finite number of seconds"),
        ({"deadline": "10"}, "deadline", "finite number of seconds"),
        ({"batch_deadline": math.nan}, "batch_deadline", "finite number of seconds"),
        ({"batch_deadline": "60"}, "batch_deadline", "finite number of seconds"),
        ({"fail_fast": "yes"}, "fail_fast", "True or False"),
        ({"fail_fast": 1}, "fail_fast", "True or False"),
        ({"on_progress": "print"}, "on_progress", "function"),
        ({"per": 60}, "per", "need rate_limit"),
        ({"burst": 5}, "burst", "need rate_limit"),
        ({"burst": 5, "limiter": RateLimiter(10)}, "burst", "need rate_limit"),
        ({"rate_limit": math.inf}, "rate_limit", "finite"),
        ({"rate_limit": True}, "rate_limit", "finite"),
        ({"limiter": "fast"}, "limiter", "Limiter"),
        ({"extra_body": {"seed": math.nan}}, "extra_body", "'seed'"),
    ],
)
async def test_batch_settings_are_checked_before_sending(
    emulator: Emulator, kwargs: dict[str, Any], field: str, needle: str
) -> None:
    """iter_generate and gather_generate refuse bad settings before anything is sent."""
    async with FluxClient(base_url=emulator.base_url) as client:
        with pytest.raises(ValidationError, match=needle) as info:
            client.iter_generate(["a", "b"], **kwargs)
        assert info.value.field == field
        with pytest.raises(ValidationError, match=needle):
            await client.gather_generate(["a", "b"], **kwargs)
    assert emulator.stats.requests == 0


async def test_per_and_burst_with_rate_limit_are_fine(client: FluxClient) -> None:
    """per and burst are accepted alongside rate_limit, and callables for on_progress."""
    seen: list[object] = []
    results = await client.gather_generate(
        ["a"], rate_limit=600, per=60, burst=2, on_progress=seen.append
    )
    assert results[0].ok
    assert len(seen) == 1


# -- client construction --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"retry": "never"}, "retry"),
        ({"retry_budget": 10}, "retry_budget"),
        ({"limiter": 5}, "limiter"),
        ({"session": "s"}, "session"),
        ({"default_headers": ["X-A"]}, "default_headers"),
        ({"default_headers": {"X-A": 1}}, "default_headers['X-A']"),
        ({"default_headers": {"X-A": "a\r\nX-Injected: 1"}}, "default_headers['X-A']"),
        ({"model": "flux\ud800"}, "model"),
        ({"max_connections": -1}, "max_connections"),
    ],
)
def test_client_settings_are_validation_errors(kwargs: dict[str, Any], field: str) -> None:
    """Every bad FluxClient setting is a ValidationError naming it, before any I/O."""
    with pytest.raises(ValidationError) as info:
        FluxClient(base_url="http://127.0.0.1:9/v1", **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize("key", ["sk-abc\n", " sk-abc", "sk-a\r\nX-Evil: 1", "sk\x00abc"])
def test_api_key_with_line_breaks_is_refused_and_not_shown(key: str) -> None:
    """A key read with its newline would fail every call: refused, and never echoed."""
    with pytest.raises(ValidationError, match="api_key") as info:
        FluxClient(api_key=key, base_url="http://127.0.0.1:9/v1")
    assert "sk" not in str(info.value)
    assert info.value.value == "<redacted>"


def test_secret_header_value_is_not_shown() -> None:
    """A bad default header value is not echoed in the error (it may be a key)."""
    with pytest.raises(ValidationError) as info:
        FluxClient(base_url="http://127.0.0.1:9/v1", default_headers={"X-Api-Key": "sk-1\n"})
    assert "sk-1" not in str(info.value)


# -- credentials over plain http ------------------------------------------------------


@pytest.mark.parametrize(
    "base_url",
    ["http://example.com/v1", "http://10.0.0.5:8000/v1", "http://[2001:db8::1]/v1"],
)
def test_key_over_plain_http_warns(base_url: str) -> None:
    """A key sent in clear text to another machine warns, pointing at the caller's line."""
    with pytest.warns(UserWarning, match="clear text") as record:
        FluxClient(api_key="sk-fake-key-123", base_url=base_url)
    assert record[0].filename == __file__
    assert "sk-fake-key-123" not in str(record[0].message)


def test_password_in_plain_http_url_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    """user:password@ in a plain-http base_url is a credential in clear text too."""
    monkeypatch.delenv("FLUX_API_KEY", raising=False)
    with pytest.warns(UserWarning, match="clear text"):
        FluxClient(base_url="http://user:pw@example.com/v1")


def test_env_key_over_plain_http_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The warning covers a key taken from $FLUX_API_KEY and a URL from $FLUX_BASE_URL."""
    monkeypatch.setenv("FLUX_API_KEY", "sk-env")
    monkeypatch.setenv("FLUX_BASE_URL", "http://gateway.internal/v1")
    with pytest.warns(UserWarning, match="gateway.internal"):
        FluxClient()


@pytest.mark.parametrize(
    "base_url",
    [
        "https://example.com/v1",
        "http://127.0.0.1:8000/v1",
        "http://127.8.9.10/v1",
        "http://localhost:8000/v1",
        "http://LOCALHOST./v1",
        "http://[::1]:8000/v1",
        "http://[::ffff:127.0.0.1]/v1",
    ],
)
def test_no_warning_for_https_or_loopback(base_url: str) -> None:
    """https, or plain http to this machine, does not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FluxClient(api_key="sk-x", base_url=base_url)


def test_no_warning_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain http with no key sends nothing secret: no warning."""
    monkeypatch.delenv("FLUX_API_KEY", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FluxClient(base_url="http://example.com/v1")

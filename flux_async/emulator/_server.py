"""The emulator: an aiohttp.web server that speaks the images contract, and its controls.

:class:`Emulator` serves ``POST /v1/images/generations`` (OpenAI dall-e-3 format, FLUX
``aspect_ratio`` extension) on a real socket, for tests and benchmarks. A generation request
goes through these steps in this order; the first step that answers ends it:

1. **arrival** - count it, take ``time.monotonic()``, fingerprint the bearer key, read the body
   and, when recording, append a :class:`SeenRequest` (so ``emu.requests`` is in arrival order);
2. **scripted fault** - the next :class:`Fault` queued with :meth:`Emulator.script`, if any.
   ``Fault.slow`` waits and then carries on with step 3; every other kind answers here;
3. **auth** - 401 ``invalid_api_key`` when keys are configured and the bearer is missing or
   unknown;
4. **validation** - 400 ``invalid_request_error`` naming ``param`` (body not a JSON object,
   missing/ill-typed/out-of-range fields);
5. **replay** - only with ``dedupe_idempotency``: a repeated ``Idempotency-Key`` whose first
   request succeeded gets the stored response again (``Idempotent-Replayed: true``);
6. **rate capacity** - per key, GCRA at ``rate_limit`` requests/second with ``burst``: 429
   ``rate_limit_exceeded`` with ``retry-after-ms`` and ``Retry-After``; a rejected request
   consumes no capacity;
7. **max in flight** - 429 ``concurrency_limit_exceeded`` with ``Retry-After: 1`` when
   ``max_in_flight`` generations are already running;
8. **latency** - ``asyncio.sleep``-like wait of ``latency`` seconds;
9. **random faults** - drawn from :class:`FaultRates` with ``random.Random(seed)``: slow first,
   then at most one of error, drop, malformed;
10. **success** - ``{"created": ..., "data": [...]}`` whose URLs the emulator itself serves at
    ``GET /v1/images/{w}x{h}/{seed}.png``.

Every answer, success or error, carries ``x-request-id: req_<hex>``. Besides the contract the
app serves ``GET /health``, ``GET /_emulator/stats`` (``?requests=1`` adds the request log) and
``POST /_emulator/reset`` so a benchmark can drive an emulator running in another process.

API keys never leave the process: they are identified everywhere (stats, requests, repr, error
messages) by :meth:`Emulator.key_id`, a short SHA-256 fingerprint.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import http
import json
import math
import os
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, Self

import attrs
from aiohttp import web

from ._png import gradient_png

__all__ = ["Emulator", "EmulatorStats", "Fault", "FaultRates", "SeenRequest"]

Outcome = Literal[
    "pending",
    "success",
    "rate_limited",
    "concurrency_limited",
    "fault",
    "bad_request",
    "unauthorized",
    "dropped",
    "replayed",
]
"""What became of a generation request; ``"pending"`` only while it is still being handled."""

MalformedKind = Literal["json", "empty_data", "no_data"]
FaultKind = Literal["status", "drop", "slow", "malformed", "html"]

# Bound once: attribute lookups on modules are measurable at thousands of requests a second.
_monotonic = time.monotonic
_wall_clock = time.time
_urandom = os.urandom
_sha256 = hashlib.sha256
_loads = json.loads
# A pre-built encoder: json.dumps(..., separators=...) would build a new encoder per call.
_encode_json = json.JSONEncoder(separators=(",", ":")).encode

MAX_PROMPT_CHARS: Final = 1000
MAX_N: Final = 10
MAX_SIDE: Final = 2048
LONG_SIDE: Final = 1024
_ANONYMOUS: Final = "anonymous"
_NOT_JSON: Final = object()
_JSON: Final = "application/json"
_HTML: Final = "text/html; charset=utf-8"
_TEXT: Final = "text/plain; charset=utf-8"
# Long enough for a response already being written to finish, short enough that closing an
# emulator with a request stuck in a handler does not stall a test.
_SHUTDOWN_GRACE: Final = 0.5
# Listen backlog: benchmarks open hundreds of connections at once.
_BACKLOG: Final = 1024
_IMAGE_CACHE_SIZE: Final = 64
_REPLAY_CAPACITY: Final = 65536
_RATIOS: Final = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
_QUALITIES: Final = frozenset({"standard", "hd"})
_RESPONSE_FORMATS: Final = frozenset({"url", "b64_json"})
_STYLES: Final = frozenset({"vivid", "natural"})
_SIZE_RE: Final = re.compile(r"([0-9]{2,5})x([0-9]{2,5})")
_TRUTHY: Final = frozenset({"1", "true", "yes", "on"})
_MALFORMED_KINDS: Final[tuple[MalformedKind, ...]] = ("json", "empty_data", "no_data")

_COUNTERS: Final = (
    "requests",
    "successes",
    "rate_limited",
    "concurrency_limited",
    "faults",
    "bad_requests",
    "unauthorized",
    "replayed",
)
_OUTCOME_COUNTER: Final[dict[str, str]] = {
    "success": "successes",
    "rate_limited": "rate_limited",
    "concurrency_limited": "concurrency_limited",
    "fault": "faults",
    "dropped": "faults",
    "bad_request": "bad_requests",
    "unauthorized": "unauthorized",
    "replayed": "replayed",
}
_JSON_TYPE_NAMES: Final[dict[type, str]] = {
    str: "a string",
    int: "an integer",
    float: "a decimal",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def _dims_for_ratio(ratio: str) -> tuple[int, int]:
    wide, tall = (int(part) for part in ratio.split(":"))
    if wide >= tall:
        return LONG_SIDE, round(LONG_SIDE * tall / wide)
    return round(LONG_SIDE * wide / tall), LONG_SIDE


_RATIO_DIMS: Final[dict[str, tuple[int, int]]] = {r: _dims_for_ratio(r) for r in _RATIOS}


def _phrase(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def _error_json(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> bytes:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return _encode_json({"error": error}).encode()


def _default_error_body(code: int) -> bytes:
    message = f"The server answered {code} {_phrase(code)} (emulator fault)."
    if code == 429:
        return _error_json(message, "requests", None, "rate_limit_exceeded")
    if code == 401:
        return _error_json(message, "invalid_request_error", None, "invalid_api_key")
    if code >= 500:
        return _error_json(message, "server_error")
    return _error_json(message, "invalid_request_error")


def _html_page(code: int) -> bytes:
    title = f"{code} {_phrase(code)}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


def _check_code(code: int, low: int) -> int:
    if isinstance(code, bool) or not isinstance(code, int) or not low <= code <= 599:
        raise ValueError(f"status must be an int in {low}..599, got {code!r}")
    return code


def _check_seconds(seconds: float) -> float:
    value = float(seconds)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
    return value


@attrs.frozen
class Fault:
    """One injected misbehaviour, queued with :meth:`Emulator.script` for the next request.

    Build faults with the constructors, not the fields.

    Example::

        emu.script(
            Fault.status(429, headers={"Retry-After": "1"}),
            Fault.drop(),
            Fault.slow(0.5),
            Fault.malformed("empty_data"),
            Fault.html(502),
        )
    """

    kind: FaultKind
    code: int = 200
    seconds: float = 0.0
    variant: MalformedKind = "json"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    content_type: str = _JSON

    @classmethod
    def status(
        cls,
        code: int,
        *,
        headers: Mapping[str, str] | None = None,
        body: str | Mapping[str, Any] | None = None,
    ) -> Fault:
        """Answer with HTTP ``code``; the default body is an OpenAI-style error JSON.

        ``body`` may be a dict (sent as JSON) or a str (sent as ``text/html`` when it starts
        with ``<``, else ``text/plain``).

        Example::

            Fault.status(503)
            Fault.status(429, headers={"Retry-After": "1"})
            Fault.status(429, headers={"Retry-After": email.utils.formatdate(usegmt=True)})
            Fault.status(400, body={"error": {"message": "nope", "type": "x"}})
        """
        _check_code(code, 200)
        if body is None:
            payload, content_type = _default_error_body(code), _JSON
        elif isinstance(body, str):
            payload = body.encode()
            content_type = _HTML if body.lstrip().startswith("<") else _TEXT
        else:
            payload, content_type = _encode_json(dict(body)).encode(), _JSON
        pairs = tuple((str(k), str(v)) for k, v in (headers or {}).items())
        return cls("status", code, headers=pairs, body=payload, content_type=content_type)

    @classmethod
    def drop(cls) -> Fault:
        """Read the request, then close the connection without answering.

        The client sees a server disconnect (aiohttp: ``ServerDisconnectedError``).

        Example::

            emu.script(Fault.drop())
        """
        return cls("drop", 0)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Wait ``seconds``, then handle the request normally (auth, validation, ...).

        Example::

            emu.script(Fault.slow(2.0))  # longer than the client's timeout
        """
        return cls("slow", 0, _check_seconds(seconds))

    @classmethod
    def malformed(cls, kind: MalformedKind = "json") -> Fault:
        """Answer 200 with a broken body.

        ``"json"``: not JSON at all; ``"empty_data"``: ``{"created": ..., "data": []}``;
        ``"no_data"``: JSON without ``data``.

        Example::

            emu.script(Fault.malformed(), Fault.malformed("empty_data"))
        """
        if kind not in _MALFORMED_KINDS:
            raise ValueError(f"kind must be one of {', '.join(_MALFORMED_KINDS)}, got {kind!r}")
        return cls("malformed", 200, variant=kind)

    @classmethod
    def html(cls, status: int = 502) -> Fault:
        """Answer with a reverse proxy's HTML error page (nginx style).

        Example::

            emu.script(Fault.html(), Fault.html(504))
        """
        _check_code(status, 400)
        return cls("html", status, body=_html_page(status), content_type=_HTML)


def _probability(value: float) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"a rate must be within 0..1, got {value!r}")
    return number


def _error_status(value: int) -> int:
    return _check_code(value, 400)


@attrs.frozen
class FaultRates:
    """Random faults, drawn per admitted request from ``random.Random(seed)``.

    ``slow_rate`` is drawn first and independently; then at most one of error, drop and
    malformed (their rates must sum to at most 1).

    Example::

        Emulator(faults=FaultRates(error_rate=0.1, error_status=503, slow_rate=0.05))
    """

    error_rate: float = attrs.field(default=0.0, converter=_probability)
    error_status: int = attrs.field(default=500, converter=_error_status)
    drop_rate: float = attrs.field(default=0.0, converter=_probability)
    slow_rate: float = attrs.field(default=0.0, converter=_probability)
    slow_seconds: float = attrs.field(default=1.0, converter=_check_seconds)
    malformed_rate: float = attrs.field(default=0.0, converter=_probability)

    def __attrs_post_init__(self) -> None:
        if self.error_rate + self.drop_rate + self.malformed_rate > 1.0 + 1e-9:
            raise ValueError("error_rate + drop_rate + malformed_rate must not exceed 1")


@attrs.define
class EmulatorStats:
    """Live counters of an :class:`Emulator` (``emu.stats``); ``snapshot()`` copies them.

    ``faults`` counts injected faults of every kind (a slow fault is counted even though the
    request then goes on to its own outcome). ``in_flight`` counts generation requests whose
    handler is running, admitted or not, so ``max_in_flight_seen`` is the client's peak
    concurrency. ``per_key`` maps a key fingerprint (or ``"anonymous"``) to the same counters.

    Example::

        assert emu.stats.successes == 3
        assert emu.stats.per_key[Emulator.key_id("sk-test")]["rate_limited"] == 1
    """

    requests: int = 0
    successes: int = 0
    rate_limited: int = 0
    concurrency_limited: int = 0
    faults: int = 0
    bad_requests: int = 0
    unauthorized: int = 0
    replayed: int = 0
    in_flight: int = 0
    max_in_flight_seen: int = 0
    per_key: dict[str, dict[str, int]] = attrs.Factory(dict)

    def snapshot(self) -> dict[str, Any]:
        """Return a JSON-able copy of every counter.

        Example::

            json.dumps(emu.stats.snapshot())
        """
        data: dict[str, Any] = {name: getattr(self, name) for name in _COUNTERS}
        data["in_flight"] = self.in_flight
        data["max_in_flight_seen"] = self.max_in_flight_seen
        data["per_key"] = {kid: dict(counts) for kid, counts in self.per_key.items()}
        return data

    def _zero(self) -> None:
        for name in _COUNTERS:
            setattr(self, name, 0)
        # Requests still being handled will decrement in_flight; zeroing it would go negative.
        self.max_in_flight_seen = self.in_flight
        self.per_key.clear()


@attrs.define
class SeenRequest:
    """One generation request as the emulator saw it (``emu.requests``, arrival order).

    ``time`` is the server's ``time.monotonic()`` at arrival; ``body`` the parsed JSON object
    (None when it was not one); ``status`` None while pending or when dropped.

    Example::

        first = emu.requests[0]
        assert first.outcome == "success" and first.body["prompt"] == "a cat"
    """

    time: float
    key_id: str
    idempotency_key: str | None
    body: dict[str, Any] | None = None
    status: int | None = None
    outcome: Outcome = "pending"


class _Invalid(Exception):
    def __init__(self, message: str, param: str | None, code: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class _Job(NamedTuple):
    prompt: str
    n: int
    width: int
    height: int
    b64: bool


def _missing(param: str) -> _Invalid:
    return _Invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _wrong_type(param: str, expected: str, value: object) -> _Invalid:
    got = _JSON_TYPE_NAMES.get(type(value), "a value")
    message = f"Invalid type for '{param}': expected {expected}, but got {got} instead."
    return _Invalid(message, param, "invalid_type")


def _bad_value(param: str, value: object, allowed: Iterable[str]) -> _Invalid:
    choices = ", ".join(f"'{v}'" for v in allowed)
    message = f"Invalid value for '{param}': {value!r}. Supported values are: {choices}."
    return _Invalid(message, param, "invalid_value")


def _optional_choice(body: dict[str, Any], param: str, allowed: frozenset[str]) -> str | None:
    value = body.get(param)
    if value is None:
        return None
    if type(value) is not str:
        raise _wrong_type(param, "a string", value)
    if value not in allowed:
        raise _bad_value(param, value, sorted(allowed))
    return value


def _validate(body: dict[str, Any], require_aspect_ratio: bool) -> _Job:
    # JSON null counts as "not given", as OpenAI does for optional parameters.
    prompt = body.get("prompt")
    if prompt is None:
        raise _missing("prompt")
    if type(prompt) is not str:
        raise _wrong_type("prompt", "a string", prompt)
    if not prompt.strip():
        raise _Invalid("Invalid 'prompt': empty string.", "prompt", "empty_string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _Invalid(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{MAX_PROMPT_CHARS}, but got a string with length {len(prompt)} instead.",
            "prompt",
            "string_above_max_length",
        )
    dims = (LONG_SIDE, LONG_SIDE)
    ratio = body.get("aspect_ratio")
    if ratio is None:
        if require_aspect_ratio:
            raise _missing("aspect_ratio")
    elif type(ratio) is not str:
        raise _wrong_type("aspect_ratio", "a string", ratio)
    else:
        found = _RATIO_DIMS.get(ratio)
        if found is None:
            raise _bad_value("aspect_ratio", ratio, _RATIOS)
        dims = found
    n = body.get("n")
    if n is None:
        n = 1
    elif type(n) is not int:
        raise _wrong_type("n", "an integer", n)
    elif n < 1:
        raise _Invalid(
            f"Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} "
            "instead.",
            "n",
            "integer_below_min_value",
        )
    elif n > MAX_N:
        raise _Invalid(
            f"Invalid 'n': integer above maximum value. Expected a value <= {MAX_N}, but got "
            f"{n} instead.",
            "n",
            "integer_above_max_value",
        )
    size = body.get("size")
    if size is not None:
        if type(size) is not str:
            raise _wrong_type("size", "a string", size)
        match = _SIZE_RE.fullmatch(size)
        if match is None:
            raise _Invalid(
                f"Invalid value for 'size': {size!r}. Expected WIDTHxHEIGHT, e.g. '1024x1024'.",
                "size",
                "invalid_value",
            )
        width, height = int(match[1]), int(match[2])
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            raise _Invalid(
                f"Invalid value for 'size': {size!r}. Each side must be 1..{MAX_SIDE}.",
                "size",
                "invalid_value",
            )
        dims = (width, height)
    _optional_choice(body, "quality", _QUALITIES)
    response_format = _optional_choice(body, "response_format", _RESPONSE_FORMATS)
    _optional_choice(body, "style", _STYLES)
    for param in ("model", "user"):
        value = body.get(param)
        if value is not None and type(value) is not str:
            raise _wrong_type(param, "a string", value)
    return _Job(prompt, n, dims[0], dims[1], response_format == "b64_json")


def _image_seed(prompt: str, index: int) -> str:
    return _sha256(b"%d\x00%s" % (index, prompt.encode())).hexdigest()[:16]


class _Gcra:
    """Generic cell rate algorithm: one float per key, no background refill task."""

    __slots__ = ("_interval", "_tat", "_tolerance")

    def __init__(self, rate: float, burst: int) -> None:
        self._interval = 1.0 / rate
        self._tolerance = self._interval * (burst - 1)
        self._tat: dict[str, float] = {}

    def acquire(self, key: str, now: float) -> float:
        """Take a permit and return 0.0, or return the seconds until one is available."""
        tat = self._tat.get(key, now)
        if tat < now:
            tat = now
        wait = tat - self._tolerance - now
        if wait > 0.0:
            return wait
        self._tat[key] = tat + self._interval
        return 0.0

    def clear(self) -> None:
        self._tat.clear()


class _Images:
    """Bounded caches of encoded pictures, so b64_json at 1024x1024 stays cheap."""

    __slots__ = ("b64", "png")

    def __init__(self, maxsize: int) -> None:
        png = functools.lru_cache(maxsize=maxsize)(gradient_png)

        def b64(width: int, height: int, seed: str) -> str:
            return base64.b64encode(png(width, height, seed)).decode("ascii")

        self.png: Callable[[int, int, str], bytes] = png
        self.b64: Callable[[int, int, str], str] = functools.lru_cache(maxsize=maxsize)(b64)


def _wake(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    if not authorization.startswith("Bearer ") and authorization[:7].lower() != "bearer ":
        return None
    return authorization[7:].strip() or None


def _json_response(
    status: int, body: bytes, request_id: str, extra: Mapping[str, str] | None = None
) -> web.Response:
    headers = {"Content-Type": _JSON, "x-request-id": request_id}
    if extra:
        headers.update(extra)
    return web.Response(status=status, body=body, headers=headers)


def _new_request_id() -> str:
    return "req_" + _urandom(12).hex()


def _drop(request: web.BaseRequest) -> web.Response:
    transport = request.transport
    if transport is not None:
        transport.close()
    # Never written: aiohttp sees the closed transport and quietly gives up on the connection.
    return web.Response()


def _not_found(request: web.BaseRequest) -> web.Response:
    message = f"Invalid URL ({request.method} {request.path})"
    return _json_response(404, _error_json(message, "invalid_request_error"), _new_request_id())


class Emulator:
    """A local server implementing ``POST /v1/images/generations``, for tests and benchmarks.

    ``api_keys=None`` accepts any (or no) bearer; ``rate_limit`` is requests/second per key
    (None: unlimited); ``max_in_flight`` caps concurrent generations (None: unlimited);
    ``port=0`` picks a free port. Keys are never shown: see :meth:`key_id`.

    Example::

        async with Emulator(api_keys=["sk-test"], rate_limit=5, burst=2) as emu:
            client = AsyncOpenAI(base_url=emu.base_url, api_key="sk-test")
            emu.script(Fault.status(503))      # the next request fails once
            ...
            assert emu.stats.successes == 1
            assert emu.requests[0].outcome == "fault"
    """

    __slots__ = (
        "_active",
        "_base_url",
        "_burst",
        "_closing",
        "_dedupe",
        "_exclusive_rate",
        "_host",
        "_images",
        "_key_ids",
        "_latency",
        "_limiter",
        "_max_in_flight",
        "_port",
        "_random_error",
        "_rate_limit",
        "_rates",
        "_record",
        "_replays",
        "_require_aspect_ratio",
        "_rng",
        "_runner",
        "_script",
        "_seed",
        "_sleepers",
        "requests",
        "stats",
    )

    def __init__(
        self,
        api_keys: Iterable[str] | None = None,
        *,
        latency: float = 0.0,
        rate_limit: float | None = None,
        burst: int = 1,
        max_in_flight: int | None = None,
        faults: FaultRates | None = None,
        seed: int = 0,
        require_aspect_ratio: bool = True,
        dedupe_idempotency: bool = False,
        record_requests: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if api_keys is None:
            self._key_ids: dict[str, str] | None = None
        else:
            keys = list(api_keys)
            if not keys or not all(isinstance(k, str) and k for k in keys):
                raise ValueError("api_keys must be None (no auth) or non-empty strings")
            self._key_ids = {key: Emulator.key_id(key) for key in keys}
        if not (math.isfinite(latency) and latency >= 0):
            raise ValueError(f"latency must be a finite number of seconds >= 0, got {latency!r}")
        self._latency = float(latency)
        if rate_limit is not None and not (math.isfinite(rate_limit) and rate_limit > 0):
            raise ValueError(f"rate_limit must be None or > 0, got {rate_limit!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an int >= 1, got {burst!r}")
        if max_in_flight is not None and (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ValueError(f"max_in_flight must be None or an int >= 1, got {max_in_flight!r}")
        if faults is not None and not isinstance(faults, FaultRates):
            raise TypeError(f"faults must be a FaultRates or None, got {type(faults).__name__}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in 0..65535, got {port!r}")
        self._rate_limit = rate_limit
        self._burst = burst
        self._limiter = None if rate_limit is None else _Gcra(rate_limit, burst)
        self._max_in_flight = max_in_flight
        self._rates = faults
        self._exclusive_rate = (
            0.0 if faults is None else faults.error_rate + faults.drop_rate + faults.malformed_rate
        )
        self._random_error = None if faults is None else Fault.status(faults.error_status)
        self._seed = seed
        self._rng = random.Random(seed)
        self._require_aspect_ratio = require_aspect_ratio
        self._dedupe = dedupe_idempotency
        self._record = record_requests
        self._host = host
        self._port = port
        self._images = _Images(_IMAGE_CACHE_SIZE)
        self._replays: dict[tuple[str, str], tuple[bytes, str]] = {}
        self._script: deque[Fault] = deque()
        self._sleepers: set[asyncio.Future[bool]] = set()
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self._closing = False
        self._active = 0
        self.stats = EmulatorStats()
        self.requests: list[SeenRequest] = []

    # -- public API -------------------------------------------------------------------------

    @staticmethod
    def key_id(key: str) -> str:
        """Fingerprint an API key so it can be named without being shown.

        Example::

            Emulator.key_id("sk-test")  # 'key-' + the first 8 hex digits of its SHA-256
        """
        return "key-" + _sha256(key.encode()).hexdigest()[:8]

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``, ready for ``AsyncOpenAI(base_url=emu.base_url)``.

        Raises ``RuntimeError`` before :meth:`start`.

        Example::

            async with Emulator() as emu:
                print(emu.base_url)  # http://127.0.0.1:54321/v1
        """
        if self._base_url is None:
            raise RuntimeError("the emulator is not running; call start() or use 'async with'")
        return self._base_url

    def script(self, *faults: Fault) -> None:
        """Queue faults for the next generation requests, one each, in arrival order.

        Example::

            emu.script(Fault.status(503), Fault.drop())  # 1st request 503, 2nd dropped, 3rd ok
        """
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"script() takes Fault objects, got {type(fault).__name__}")
        self._script.extend(faults)

    def reset(self) -> None:
        """Zero the counters, forget recorded requests, the fault script, rate-limit state,
        stored idempotent responses, and restart the random fault sequence from ``seed``.

        Example::

            emu.reset()
            assert emu.stats.requests == 0 and emu.requests == []
        """
        self.stats._zero()
        self.requests.clear()
        self._script.clear()
        self._replays.clear()
        if self._limiter is not None:
            self._limiter.clear()
        self._rng.seed(self._seed)

    async def start(self) -> None:
        """Bind and start serving (``async with`` does this for you).

        Example::

            emu = Emulator()
            await emu.start()
            try:
                ...
            finally:
                await emu.close()
        """
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        runner = web.AppRunner(
            self._make_app(),
            # Access logging costs more than the rest of the hot path; the stats replace it.
            access_log=None,
            handle_signals=False,
            shutdown_timeout=_SHUTDOWN_GRACE,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, backlog=_BACKLOG)
            await site.start()
            port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            raise
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._closing = False
        self._runner = runner
        self._base_url = f"http://{host}:{port}/v1"

    async def close(self) -> None:
        """Stop serving; requests still waiting (latency, slow faults) are dropped.

        Safe to call more than once.

        Example::

            await emu.close()
            await emu.close()  # no-op
        """
        runner = self._runner
        if runner is None:
            return
        self._runner = None
        self._base_url = None
        self._closing = True
        for waiter in self._sleepers:
            if not waiter.done():
                waiter.set_result(False)
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        keys = None if self._key_ids is None else sorted(self._key_ids.values())
        where = self._base_url or f"{self._host}:{self._port} (not running)"
        return f"<Emulator {where} keys={keys} rate_limit={self._rate_limit} burst={self._burst}>"

    # -- the app ------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application()
        router = app.router
        generations = router.add_resource("/v1/images/generations")
        generations.add_route("POST", self._on_generate)
        generations.add_route("*", self._method_not_allowed)
        router.add_get(
            r"/v1/images/{width:[0-9]{1,5}}x{height:[0-9]{1,5}}/{seed:[0-9a-f]{1,64}}.png",
            self._on_image,
        )
        health = router.add_resource("/health")
        health.add_route("GET", self._on_health)
        health.add_route("*", self._method_not_allowed)
        stats = router.add_resource("/_emulator/stats")
        stats.add_route("GET", self._on_stats)
        stats.add_route("*", self._method_not_allowed)
        reset = router.add_resource("/_emulator/reset")
        reset.add_route("POST", self._on_reset)
        reset.add_route("*", self._method_not_allowed)
        router.add_route("*", "/{tail:.*}", self._on_unknown_path)
        return app

    async def _on_generate(self, request: web.Request) -> web.StreamResponse:
        now = _monotonic()
        stats = self.stats
        stats.requests += 1
        in_flight = stats.in_flight + 1
        stats.in_flight = in_flight
        if in_flight > stats.max_in_flight_seen:
            stats.max_in_flight_seen = in_flight
        headers = request.headers
        key = _bearer(headers.get("Authorization"))
        key_ids = self._key_ids
        if key is None:
            kid = _ANONYMOUS
            authorized = key_ids is None
        else:
            known = None if key_ids is None else key_ids.get(key)
            authorized = key_ids is None or known is not None
            kid = known or Emulator.key_id(key)
        counts = stats.per_key.get(kid)
        if counts is None:
            counts = stats.per_key[kid] = dict.fromkeys(_COUNTERS, 0)
        counts["requests"] += 1
        idempotency_key = headers.get("Idempotency-Key")
        seen = None
        if self._record:
            seen = SeenRequest(now, kid, idempotency_key)
            self.requests.append(seen)
        try:
            response, outcome = await self._process(
                request, authorized, kid, counts, idempotency_key, seen
            )
        except BaseException:
            if seen is not None:
                seen.outcome = "dropped"
            raise
        finally:
            stats.in_flight -= 1
        # Drops caused by close() are the emulator going away, not injected faults.
        if not (outcome == "dropped" and self._closing):
            counter = _OUTCOME_COUNTER[outcome]
            setattr(stats, counter, getattr(stats, counter) + 1)
            counts[counter] += 1
        if seen is not None:
            seen.outcome = outcome
            seen.status = None if outcome == "dropped" else response.status
        return response

    async def _process(
        self,
        request: web.Request,
        authorized: bool,
        kid: str,
        counts: dict[str, int],
        idempotency_key: str | None,
        seen: SeenRequest | None,
    ) -> tuple[web.StreamResponse, Outcome]:
        request_id = _new_request_id()
        raw = await request.read()
        try:
            parsed: Any = _loads(raw)
        except ValueError:
            parsed = _NOT_JSON
        body: dict[str, Any] | None = parsed if type(parsed) is dict else None
        if seen is not None:
            seen.body = body

        if self._script:
            fault = self._script.popleft()
            if fault.kind != "slow":
                return self._fault_response(request, fault, request_id)
            self._count_fault(counts)
            if not await self._sleep(fault.seconds):
                return _drop(request), "dropped"

        if not authorized:
            if kid == _ANONYMOUS:
                message = (
                    "You didn't provide an API key. You need to provide your API key in an "
                    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                )
            else:
                message = f"Incorrect API key provided ({kid})."
            error = _error_json(message, "invalid_request_error", None, "invalid_api_key")
            return _json_response(401, error, request_id), "unauthorized"

        if body is None:
            if parsed is _NOT_JSON:
                message = (
                    "We could not parse the JSON body of your request. The request body must "
                    "be a JSON object."
                )
            else:
                message = "Invalid type for request body: expected an object."
            error = _error_json(message, "invalid_request_error")
            return _json_response(400, error, request_id), "bad_request"
        try:
            job = _validate(body, self._require_aspect_ratio)
        except _Invalid as exc:
            error = _error_json(exc.message, "invalid_request_error", exc.param, exc.code)
            return _json_response(400, error, request_id), "bad_request"

        if self._dedupe and idempotency_key is not None:
            stored = self._replays.get((kid, idempotency_key))
            if stored is not None:
                replay_headers = {"Idempotent-Replayed": "true"}
                return _json_response(200, stored[0], stored[1], replay_headers), "replayed"

        limiter = self._limiter
        if limiter is not None:
            wait = limiter.acquire(kid, _monotonic())
            if wait > 0.0:
                return self._rate_limited(kid, wait, request_id), "rate_limited"

        limit = self._max_in_flight
        if limit is not None and self._active >= limit:
            message = f"Too many concurrent requests for this server (limit {limit})."
            error = _error_json(message, "requests", None, "concurrency_limit_exceeded")
            headers = {"Retry-After": "1"}
            return _json_response(429, error, request_id, headers), "concurrency_limited"

        self._active += 1
        try:
            if self._latency and not await self._sleep(self._latency):
                return _drop(request), "dropped"
            if self._rates is not None:
                faulted = await self._random_fault(request, self._rates, counts, request_id)
                if faulted is not None:
                    return faulted
            return self._success(request, job, kid, idempotency_key, request_id), "success"
        finally:
            self._active -= 1

    def _count_fault(self, counts: dict[str, int]) -> None:
        self.stats.faults += 1
        counts["faults"] += 1

    async def _sleep(self, seconds: float) -> bool:
        """Wait like asyncio.sleep; return False at once when the emulator is closing."""
        if self._closing:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        handle = loop.call_later(seconds, _wake, waiter)
        self._sleepers.add(waiter)
        try:
            return await waiter
        finally:
            handle.cancel()
            self._sleepers.discard(waiter)

    def _fault_response(
        self, request: web.Request, fault: Fault, request_id: str
    ) -> tuple[web.StreamResponse, Outcome]:
        if fault.kind == "drop":
            return _drop(request), "dropped"
        if fault.kind == "malformed":
            return self._malformed(fault.variant, request_id), "fault"
        headers = {"Content-Type": fault.content_type, "x-request-id": request_id}
        headers.update(fault.headers)
        return web.Response(status=fault.code, body=fault.body, headers=headers), "fault"

    @staticmethod
    def _malformed(variant: MalformedKind, request_id: str) -> web.Response:
        created = int(_wall_clock())
        if variant == "empty_data":
            body = b'{"created":%d,"data":[]}' % created
        elif variant == "no_data":
            body = b'{"created":%d}' % created
        else:
            body = b'{"created":%d,"data":[{"url":"http://' % created
        return _json_response(200, body, request_id)

    async def _random_fault(
        self, request: web.Request, rates: FaultRates, counts: dict[str, int], request_id: str
    ) -> tuple[web.StreamResponse, Outcome] | None:
        rng = self._rng
        if rates.slow_rate and rng.random() < rates.slow_rate:
            self._count_fault(counts)
            if not await self._sleep(rates.slow_seconds):
                return _drop(request), "dropped"
        if not self._exclusive_rate:
            return None
        draw = rng.random()
        if draw < rates.error_rate:
            assert self._random_error is not None
            return self._fault_response(request, self._random_error, request_id)
        draw -= rates.error_rate
        if draw < rates.drop_rate:
            return _drop(request), "dropped"
        draw -= rates.drop_rate
        if draw < rates.malformed_rate:
            return self._malformed(rng.choice(_MALFORMED_KINDS), request_id), "fault"
        return None

    def _rate_limited(self, kid: str, wait: float, request_id: str) -> web.Response:
        wait_ms = max(1, math.ceil(wait * 1000.0))
        message = (
            f"Rate limit reached for requests on {kid}: limit {self._rate_limit:g}/s "
            f"(burst {self._burst}). Please try again in {wait_ms}ms."
        )
        error = _error_json(message, "requests", None, "rate_limit_exceeded")
        headers = {"retry-after-ms": str(wait_ms), "Retry-After": str(max(1, math.ceil(wait)))}
        return _json_response(429, error, request_id, headers)

    def _success(
        self,
        request: web.Request,
        job: _Job,
        kid: str,
        idempotency_key: str | None,
        request_id: str,
    ) -> web.Response:
        width, height, prompt = job.width, job.height, job.prompt
        items: list[dict[str, str]]
        if job.b64:
            b64 = self._images.b64
            items = [
                {"b64_json": b64(width, height, _image_seed(prompt, i)), "revised_prompt": prompt}
                for i in range(job.n)
            ]
        else:
            # The Host header, so the URL works however the client reached us (0.0.0.0, docker).
            prefix = f"http://{request.host}/v1/images/{width}x{height}/"
            items = [
                {"url": f"{prefix}{_image_seed(prompt, i)}.png", "revised_prompt": prompt}
                for i in range(job.n)
            ]
        body = _encode_json({"created": int(_wall_clock()), "data": items}).encode()
        if self._dedupe and idempotency_key is not None:
            replays = self._replays
            if len(replays) >= _REPLAY_CAPACITY:
                del replays[next(iter(replays))]
            replays[(kid, idempotency_key)] = (body, request_id)
        return _json_response(200, body, request_id)

    async def _on_image(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        width, height = int(info["width"]), int(info["height"])
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            return _not_found(request)
        png = self._images.png(width, height, info["seed"])
        # The bytes are a pure function of the path, so caches may keep them forever.
        headers = {"Content-Type": "image/png", "Cache-Control": "public, max-age=31536000"}
        return web.Response(body=png, headers=headers)

    async def _on_health(self, request: web.Request) -> web.StreamResponse:
        return _json_response(200, b'{"status":"ok"}', _new_request_id())

    async def _on_stats(self, request: web.Request) -> web.StreamResponse:
        data = self.stats.snapshot()
        if request.query.get("requests", "").lower() in _TRUTHY:
            data["request_count"] = data["requests"]
            data["requests"] = [[r.time, r.outcome, r.status] for r in self.requests]
        return _json_response(200, _encode_json(data).encode(), _new_request_id())

    async def _on_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return _json_response(200, _encode_json(self.stats.snapshot()).encode(), _new_request_id())

    @staticmethod
    async def _on_unknown_path(request: web.Request) -> web.StreamResponse:
        return _not_found(request)

    @staticmethod
    async def _method_not_allowed(request: web.Request) -> web.StreamResponse:
        match_info = request.match_info
        route = match_info.route
        resource = route.resource
        allowed = sorted(
            r.method for r in (resource if resource is not None else ()) if r.method != "*"
        )
        message = (
            f"Invalid method for {request.path}: {request.method} (allowed: {', '.join(allowed)})."
        )
        error = _error_json(message, "invalid_request_error", None, "method_not_allowed")
        return _json_response(405, error, _new_request_id(), {"Allow": ", ".join(allowed)})

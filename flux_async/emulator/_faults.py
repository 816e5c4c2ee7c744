"""The fault model: :class:`Fault` (one scripted misbehaviour), :class:`FaultRates` (random).

Also the bodies faults answer with: the default OpenAI-style error for a status, an nginx-style
HTML error page, and the three kinds of broken 200 body.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs

from ._wire import HTML, JSON, TEXT, encode_json, error_json, phrase

__all__ = ["MALFORMED_KINDS", "Fault", "FaultKind", "FaultRates", "MalformedKind", "malformed_body"]

MalformedKind = Literal["json", "empty_data", "no_data"]
FaultKind = Literal["status", "drop", "slow", "malformed", "html"]

MALFORMED_KINDS: Final[tuple[MalformedKind, ...]] = ("json", "empty_data", "no_data")

_wall_clock = time.time


def _default_error_body(code: int) -> bytes:
    message = f"The server answered {code} {phrase(code)} (emulator fault)."
    if code == 429:
        return error_json(message, "requests", None, "rate_limit_exceeded")
    if code == 401:
        return error_json(message, "invalid_request_error", None, "invalid_api_key")
    if code >= 500:
        return error_json(message, "server_error")
    return error_json(message, "invalid_request_error")


def _html_page(code: int) -> bytes:
    title = f"{code} {phrase(code)}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


def malformed_body(variant: MalformedKind) -> bytes:
    """The broken 200 body of :meth:`Fault.malformed`."""
    created = int(_wall_clock())
    if variant == "empty_data":
        return b'{"created":%d,"data":[]}' % created
    if variant == "no_data":
        return b'{"created":%d}' % created
    return b'{"created":%d,"data":[{"url":"http://' % created


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
    content_type: str = JSON

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
            payload, content_type = _default_error_body(code), JSON
        elif isinstance(body, str):
            payload = body.encode()
            content_type = HTML if body.lstrip().startswith("<") else TEXT
        else:
            payload, content_type = encode_json(dict(body)).encode(), JSON
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
        if kind not in MALFORMED_KINDS:
            raise ValueError(f"kind must be one of {', '.join(MALFORMED_KINDS)}, got {kind!r}")
        return cls("malformed", 200, variant=kind)

    @classmethod
    def html(cls, status: int = 502) -> Fault:
        """Answer with a reverse proxy's HTML error page (nginx style).

        Example::

            emu.script(Fault.html(), Fault.html(504))
        """
        _check_code(status, 400)
        return cls("html", status, body=_html_page(status), content_type=HTML)


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

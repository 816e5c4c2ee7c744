"""What the emulator writes on the wire: compact JSON, the OpenAI error body, responses, ids.

Every error the emulator answers, from request validation to aiohttp's own protocol errors,
is built by :func:`error_json`, so they all share one shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": null}}
"""

from __future__ import annotations

import http
import json
import os
from collections.abc import Mapping
from typing import Final

from aiohttp import web

__all__ = [
    "HTML",
    "JSON",
    "TEXT",
    "encode_json",
    "error_json",
    "error_type",
    "json_response",
    "new_request_id",
    "phrase",
]

JSON: Final = "application/json"
HTML: Final = "text/html; charset=utf-8"
TEXT: Final = "text/plain; charset=utf-8"

# Bound once: attribute lookups on modules are measurable at thousands of requests a second.
_urandom = os.urandom
# A pre-built encoder: json.dumps(..., separators=...) would build a new encoder per call.
# ensure_ascii (the default) also keeps any lone surrogate echoed back in a message encodable.
encode_json = json.JSONEncoder(separators=(",", ":")).encode


def phrase(code: int) -> str:
    """The reason phrase of an HTTP status (``"Error"`` for codes without one)."""
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def error_type(code: int) -> str:
    """The OpenAI error ``type`` for an HTTP status: server errors are ``server_error``."""
    return "server_error" if code >= 500 else "invalid_request_error"


def error_json(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> bytes:
    """The OpenAI error body, encoded."""
    error = {"message": message, "type": type_, "param": param, "code": code}
    return encode_json({"error": error}).encode()


def json_response(
    status: int, body: bytes, request_id: str, extra: Mapping[str, str] | None = None
) -> web.Response:
    """A response with an encoded JSON ``body`` and the ``x-request-id`` every answer carries."""
    headers = {"Content-Type": JSON, "x-request-id": request_id}
    if extra:
        headers.update(extra)
    return web.Response(status=status, body=body, headers=headers)


def new_request_id() -> str:
    """A fresh ``req_<hex>`` id for the ``x-request-id`` header."""
    return "req_" + _urandom(12).hex()

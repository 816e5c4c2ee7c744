"""The HTTP side: the aiohttp app (routes and the small endpoints) and the runner serving it.

Routes: ``POST /v1/images/generations`` (:class:`Pipeline`), ``GET /v1/images/{w}x{h}/{seed}.png``,
``GET /health``, ``GET /_emulator/stats`` (``?requests=1`` adds the request log) and
``POST /_emulator/reset``; another method on these paths is a 405, any other path a 404.

Every error the server answers has the OpenAI JSON shape, including the ones aiohttp makes
itself before or around a handler: a malformed request or header (400), an unsupported
``Content-Encoding`` (400), an unknown ``Expect`` (417). :class:`Runner` and the ``Expect``
handler arrange that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from aiohttp import HttpVersion11, web
from aiohttp.web_protocol import RequestPayloadError

from ._images import expired
from ._pipeline import Pipeline
from ._validation import MAX_BODY_BYTES, MAX_SIDE
from ._wire import encode_json, error_json, error_type, json_response, new_request_id, phrase

__all__ = ["Runner", "make_app"]

_TRUTHY: Final = frozenset({"1", "true", "yes", "on"})


def make_app(pipeline: Pipeline, reset: Callable[[], None]) -> web.Application:
    """The aiohttp app of an emulator whose generations ``pipeline`` answers."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    add = app.router.add_resource

    async def on_image(request: web.Request) -> web.StreamResponse:
        info = request.match_info
        width, height = int(info["width"]), int(info["height"])
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            return _not_found(request)
        if expired(request.query.get("expires")):
            # What a signed bucket URL answers once it has expired.
            error = error_json("Request has expired", "invalid_request_error", None, "expired")
            return json_response(403, error, new_request_id())
        png = pipeline.images.png(width, height, info["seed"])
        # The bytes are a pure function of the path, so caches may keep them forever.
        headers = {"Content-Type": "image/png", "Cache-Control": "public, max-age=31536000"}
        return web.Response(body=png, headers=headers)

    async def on_stats(request: web.Request) -> web.StreamResponse:
        data = pipeline.stats.snapshot()
        if request.query.get("requests", "").lower() in _TRUTHY:
            data["request_count"] = data["requests"]
            data["requests"] = [[r.time, r.outcome, r.status] for r in pipeline.requests]
        return json_response(200, encode_json(data).encode(), new_request_id())

    async def on_reset(request: web.Request) -> web.StreamResponse:
        reset()
        body = encode_json(pipeline.stats.snapshot()).encode()
        return json_response(200, body, new_request_id())

    for path, method, handler in (
        ("/v1/images/generations", "POST", pipeline.handle),
        ("/health", "GET", _on_health),
        ("/_emulator/stats", "GET", on_stats),
        ("/_emulator/reset", "POST", on_reset),
    ):
        resource = add(path)
        resource.add_route(method, handler, expect_handler=_on_expect)
        resource.add_route("*", _method_not_allowed, expect_handler=_on_expect)
    app.router.add_get(
        r"/v1/images/{width:[0-9]{1,5}}x{height:[0-9]{1,5}}/{seed:[0-9a-f]{1,64}}.png",
        on_image,
        expect_handler=_on_expect,
    )
    app.router.add_route("*", "/{tail:.*}", _on_unknown_path, expect_handler=_on_expect)
    return app


async def _on_expect(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's default ``Expect`` handling, answering an unknown expectation as JSON.

    The default raises a plain-text 417, and a 500 when the header holds bytes that are not
    UTF-8 (its text cannot be encoded); both happen before any middleware could step in.
    """
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The interim answer is not part of the response proper, which has not started.
        request.writer.output_size = 0
        return None
    return _error_response(417, f"Unknown Expect: {expect}")


async def _on_health(request: web.Request) -> web.StreamResponse:
    return json_response(200, b'{"status":"ok"}', new_request_id())


async def _on_unknown_path(request: web.Request) -> web.StreamResponse:
    return _not_found(request)


def _not_found(request: web.BaseRequest) -> web.Response:
    message = f"Invalid URL ({request.method} {request.path})"
    return json_response(404, error_json(message, "invalid_request_error"), new_request_id())


async def _method_not_allowed(request: web.Request) -> web.StreamResponse:
    resource = request.match_info.route.resource
    allowed = sorted(
        r.method for r in (resource if resource is not None else ()) if r.method != "*"
    )
    message = (
        f"Invalid method for {request.path}: {request.method} (allowed: {', '.join(allowed)})."
    )
    error = error_json(message, "invalid_request_error", None, "method_not_allowed")
    return json_response(405, error, new_request_id(), {"Allow": ", ".join(allowed)})


# -- errors aiohttp answers itself ------------------------------------------------------------


def _error_response(status: int, message: str) -> web.Response:
    return json_response(status, error_json(message, error_type(status)), new_request_id())


class _Protocol(web.RequestHandler):
    """aiohttp's connection handler, with its error answers in the OpenAI JSON shape.

    ``handle_error`` answers requests aiohttp could not parse (bad request line, header too
    long, unsupported ``Content-Encoding``, broken chunked framing) and handlers that raised.
    """

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # The base class logs, and raises when part of an answer was already sent.
        super().handle_error(request, status, exc, message)
        if status >= 500:
            # A handler's exception text is internal; say no more than OpenAI does.
            message = "The server had an error while processing your request."
        elif not message:
            message = f"{status} {phrase(status)}"
        response = _error_response(status, message)
        # A request that could not be parsed leaves the connection at an unknown position.
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # A corrupt request body was answered with a 400 already; aiohttp trips over it again
        # when it drains the rest of the body afterwards, and would log that as unhandled.
        if isinstance(kwargs.get("exc_info"), RequestPayloadError):
            return
        super().log_exception(*args, **kwargs)


class _Server(web.Server):
    """aiohttp's low-level server, making :class:`_Protocol` connection handlers."""

    def __call__(self) -> web.RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """An ``AppRunner`` whose every error answer, aiohttp's own included, is OpenAI JSON."""

    async def _make_server(self) -> web.Server:
        # aiohttp has no option for the connection handler class, so rebuild the server it
        # made for the app as a _Server, with the same arguments.
        built = await super()._make_server()
        return _Server(
            built.request_handler,
            request_factory=built.request_factory,
            handler_cancellation=built.handler_cancellation,
            loop=built._loop,
            **built._kwargs,
        )

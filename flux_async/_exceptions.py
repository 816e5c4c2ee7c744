"""Every error flux-async raises, and the one place aiohttp's errors become ours.

The tree::

    FluxError
    ├── ValidationError            (also a ValueError) bad input, raised before any I/O
    ├── ClientClosedError          (also a RuntimeError) the client was used after aclose()
    ├── EventLoopError             (also a RuntimeError) used from two event loops at once
    ├── ImageSaveError             an image could not be saved (after its generation succeeded)
    │   └── ImageDownloadError     its URL could not be fetched, or its bytes are not an image
    ├── BatchStoppedError          a fan-out prompt not sent: the batch stopped on a fatal answer
    └── APIError                   something went wrong talking to the server
        ├── APIStatusError         the server answered with an error status
        │   ├── BadRequestError            400
        │   ├── AuthenticationError        401
        │   ├── PermissionDeniedError      403
        │   ├── NotFoundError              404
        │   ├── ConflictError              409
        │   ├── UnprocessableEntityError   422
        │   ├── RateLimitError             429  (.retry_after)
        │   └── InternalServerError        >= 500
        ├── APIResponseValidationError     a 2xx whose body is not a usable image list
        └── APIConnectionError     no usable response: refused, reset, dropped, DNS
            └── APITimeoutError    an attempt or the whole call ran out of time
                └── DeadlineExceededError  the call's deadline passed (retries included)

Every `APIError` carries ``attempts``: how many HTTP attempts the call made before it
gave up, so a failure in a batch says how hard we tried.

`translate_aiohttp_error` is the only function that looks at aiohttp's exception types;
``tests/test_exceptions.py`` walks every ``aiohttp.ClientError`` subclass through it.
`parse_json` is the only place a body from the network is parsed: whatever the server
sends, it either returns JSON values (finite numbers only) or raises ``ValueError``.
"""

from __future__ import annotations

import html
import json
import math
import re
import reprlib
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import aiohttp

__all__ = [
    "MAX_BODY_EXCERPT",
    "MAX_PARSED_BODY",
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchStoppedError",
    "ClientClosedError",
    "ConflictError",
    "DeadlineExceededError",
    "EventLoopError",
    "FluxError",
    "ImageDownloadError",
    "ImageSaveError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "UnprocessableEntityError",
    "ValidationError",
    "error_body",
    "error_for_status",
    "parse_json",
    "translate_aiohttp_error",
]

#: An error keeps a body of at most this many bytes parsed (`APIStatusError.body`) ...
MAX_PARSED_BODY = 64 * 1024
#: ... and of any other body at most this many characters of text: a batch keeps one
#: error per failed prompt, so a multi-megabyte error page must not be kept whole.
MAX_BODY_EXCERPT = 2000


class FluxError(Exception):
    """Root of every error flux-async raises: ``except FluxError`` catches them all.

    Example::

        try:
            await client.generate("a red fox")
        except flux_async.FluxError as exc:
            print("generation failed:", exc)
    """


class ValidationError(FluxError, ValueError):
    """A request field has a value the API does not allow; nothing was sent.

    ``field`` names the field, ``value`` is what was given and ``allowed`` says what
    would be accepted.

    Example::

        try:
            flux_async.ImageRequest(prompt="x", n=11)
        except flux_async.ValidationError as exc:
            assert exc.field == "n"
    """

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={short_repr(value)} is not allowed: {allowed}")


class ClientClosedError(FluxError, RuntimeError):
    """The client was used after ``aclose()``: create a new `FluxClient` instead.

    Example::

        await client.aclose()
        await client.generate("x")   # raises ClientClosedError
    """


class ImageSaveError(FluxError):
    """A generated image could not be saved: fetching it, checking it or writing it failed.

    ``url`` is the image's full URL (None for a ``b64_json`` image), kept so that it can
    still be fetched while it is valid; messages show it without its query string, which
    often carries a signature. ``path`` is where it was to be written. Inside a fan-out
    with ``save_to=`` the generation had succeeded: ``response`` is its `ImagesResponse`
    (nothing the server returned is lost), ``request_id`` the server's id for it and
    ``attempts`` the generation's attempts. A failed write (disk full, permissions) is
    this class with the ``OSError`` as its ``__cause__``; `Image.save` itself lets the
    ``OSError`` through, as ``open()`` would.

    Example::

        for result in await client.gather_generate(prompts, save_to="out"):
            if isinstance(result.error, flux_async.ImageSaveError):
                print("generated but not saved:", result.error.url)
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        path: str | None = None,
        response: object = None,
        request_id: str | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.path = path
        self.response = response
        self.request_id = request_id
        self.attempts = attempts


class ImageDownloadError(ImageSaveError):
    """An image's URL could not be fetched (after retries), or its bytes are no image.

    Raised when the download ends in an error status (``status_code``), fails to connect
    after the retry policy's attempts (``download_attempts`` says how many were made), is
    longer than the size cap, or brings back something that is not a PNG, JPEG or WebP
    image (``content_type`` is what the server called it). A ``b64_json`` image that is
    not valid base64, or not an image, is this error too (with ``url`` None).

    Example::

        try:
            await image.save("fox.png", client=client)
        except flux_async.ImageDownloadError as exc:
            print(exc.status_code, exc.content_type)
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        path: str | None = None,
        status_code: int | None = None,
        content_type: str | None = None,
        download_attempts: int = 0,
    ) -> None:
        super().__init__(message, url=url, path=path)
        self.status_code = status_code
        self.content_type = content_type
        self.download_attempts = download_attempts


class BatchStoppedError(FluxError):
    """A fan-out prompt that was not sent: the batch stopped on a fatal answer.

    A fan-out stops when the server answers with a status in ``stop_on`` (by default
    401, 403 and 404: a wrong key, a key without access, a wrong ``base_url``), which
    every other prompt would get too. The prompts after it end with this error instead
    of being sent; so do they after a prompt could not reach a server that has never
    answered (a wrong host or port). ``reason`` is the error that stopped the batch (with
    its hint, such as "Check base_url ..."), ``attempts`` what this prompt had sent
    before (0 for most).

    Example::

        results = await client.gather_generate(prompts)
        stopped = [r for r in results if isinstance(r.error, flux_async.BatchStoppedError)]
        if stopped:
            print("fix this and rerun:", stopped[0].error.reason)
    """

    def __init__(self, message: str, *, reason: BaseException, attempts: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.attempts = attempts


class EventLoopError(FluxError, RuntimeError):
    """A client, limiter or transport was used from a second event loop while still busy
    in another. Create one per event loop (or per thread running a loop). Also raised by
    a `SyncFluxClient` used inside a running event loop, where `FluxClient` belongs.

    Example::

        try:
            await client.generate("x")
        except flux_async.EventLoopError:
            client = FluxClient()   # one client per loop
    """


class APIError(FluxError):
    """Talking to the server failed; ``attempts`` says how many HTTP attempts were made.

    Example::

        except flux_async.APIError as exc:
            log.warning("gave up after %d attempts: %s", exc.attempts, exc)
    """

    def __init__(self, message: str, *, attempts: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.attempts = attempts


class APIStatusError(APIError):
    """The server answered with an error status.

    ``status_code`` is the HTTP status and ``request_id`` the server's ``x-request-id``
    when it sent one. ``body`` is bounded, whatever the server sent: the parsed JSON
    error body when the body is JSON of at most `MAX_PARSED_BODY` bytes (64 KiB);
    otherwise (a proxy's HTML page, invalid JSON, a larger body) its first
    `MAX_BODY_EXCERPT` characters (2,000) as text. The server's message quoted in
    ``str(exc)`` is one line of at most 300 characters.

    Example::

        except flux_async.APIStatusError as exc:
            print(exc.status_code, exc.request_id, exc.body)
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: object = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message, attempts=attempts)
        self.status_code = status_code
        self.body = body
        self.request_id = request_id
        self.headers: Mapping[str, str] = headers if headers is not None else {}

    @property
    def code(self) -> str | None:
        """The provider's error code from the body's ``error`` object (openai's
        ``code``, e.g. ``"content_policy_violation"``), or None.

        Example::

            if exc.code == "content_policy_violation": ...
        """
        return self._error_field("code")

    @property
    def type(self) -> str | None:
        """The provider's error type from the body's ``error`` object (openai's
        ``type``, e.g. ``"invalid_request_error"``), or None.

        Example::

            print(exc.type)
        """
        return self._error_field("type")

    @property
    def param(self) -> str | None:
        """The request field the provider's error names (openai's ``param``), or None.

        Example::

            print(exc.param)  # 'size'
        """
        return self._error_field("param")

    def _error_field(self, name: str) -> str | None:
        body = self.body
        if not isinstance(body, Mapping):
            return None
        error = body.get("error")
        value = (error if isinstance(error, Mapping) else body).get(name)
        if isinstance(value, bool) or not isinstance(value, str | int):
            return None
        return str(value)


class BadRequestError(APIStatusError):
    """400: the server rejected the request body. Not retried; fix the request.

    Example::

        except flux_async.BadRequestError as exc:
            print("server says:", exc.message)
    """


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong. Not retried.

    Example::

        except flux_async.AuthenticationError:
            sys.exit("set FLUX_API_KEY to a valid key")
    """


class PermissionDeniedError(APIStatusError):
    """403: the key may not use this model or endpoint. Not retried.

    Example::

        except flux_async.PermissionDeniedError as exc:
            print(exc.status_code)  # 403
    """


class NotFoundError(APIStatusError):
    """404: wrong ``base_url`` (it should end in ``/v1``) or unknown model. Not retried.

    Example::

        except flux_async.NotFoundError:
            print("check base_url")
    """


class ConflictError(APIStatusError):
    """409: the server saw a conflicting request (often a reused idempotency key). Retried.

    Example::

        except flux_async.ConflictError as exc:
            print(exc.attempts)
    """


class UnprocessableEntityError(APIStatusError):
    """422: the body parsed but its values were refused. Not retried.

    Example::

        except flux_async.UnprocessableEntityError as exc:
            print(exc.body)
    """


class RateLimitError(APIStatusError):
    """429: the key's rate limit was hit and retries did not get through in time.

    ``retry_after`` is the server's ``Retry-After`` in seconds, or ``None``.

    Example::

        except flux_async.RateLimitError as exc:
            await asyncio.sleep(exc.retry_after or 1.0)
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 429,
        body: object = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        attempts: int = 1,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            message,
            status_code=status_code,
            body=body,
            request_id=request_id,
            headers=headers,
            attempts=attempts,
        )
        self.retry_after = retry_after


class InternalServerError(APIStatusError):
    """5xx: the server or the model behind it failed. Retried by default.

    Example::

        except flux_async.InternalServerError as exc:
            print(exc.status_code)  # 500, 502, 503, 504 ...
    """


class APIResponseValidationError(APIError):
    """A 2xx answer whose body is not a usable image list (bad JSON, empty ``data``).

    ``body`` is what the server sent, bounded as for `APIStatusError`: the parsed JSON
    when the body is valid JSON of at most 64 KiB, else its first 2,000 characters as
    text. Not retried: the server may already have billed it.

    Example::

        except flux_async.APIResponseValidationError as exc:
            print(exc.body)
    """

    def __init__(
        self,
        message: str,
        *,
        body: object = None,
        request_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message, attempts=attempts)
        self.body = body
        self.request_id = request_id


class APIConnectionError(APIError):
    """No usable response: connection refused or reset, dropped, DNS failure. Retried.

    Example::

        except flux_async.APIConnectionError:
            print("is the server up?")
    """


class APITimeoutError(APIConnectionError):
    """An attempt, or the whole call, ran out of time. Retried while time is left.

    Example::

        except flux_async.APITimeoutError:
            print("raise Timeout(total=...) for slow models")
    """


class DeadlineExceededError(APITimeoutError):
    """The call's ``deadline`` passed, retries and waits included. Not retried.

    Example::

        try:
            await client.generate("x", deadline=30)
        except flux_async.DeadlineExceededError as exc:
            print(exc.attempts)
    """


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        # 1e400 parses to inf, which later breaks int() and every consumer of the number.
        raise ValueError(f"{text[:40]} is too large for a float")
    return value


# Called only for NaN/Infinity and for numbers with a fraction or exponent, so a body
# of strings and integers (every image response) parses at json.loads' speed.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
# The decoder's own scanner (the C one), for the fast path of `parse_json`; typeshed
# does not declare the attribute.
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def parse_json(raw: bytes | str) -> Any:
    """Parse JSON that came from the network: any failure is a ``ValueError`` saying why.

    Stricter than ``json.loads``: the bytes must be UTF-8 (a leading BOM is allowed),
    ``NaN`` / ``Infinity`` and numbers beyond a float's range are refused, and nesting
    too deep for the parser is a ``ValueError`` rather than a ``RecursionError``.

    Example::

        parse_json(b'{"created": 1}')  # {'created': 1}
        parse_json(b'{"created": NaN}')  # ValueError: NaN is not a JSON number
    """
    try:
        text = raw if isinstance(raw, str) else raw.decode()
        if text[:1] == "{":
            # The common answer, an object with nothing around it: the scanner alone,
            # without decode()'s two whitespace matches and two calls (once per answer).
            try:
                parsed, end = _SCAN(text, 0)
            except StopIteration:
                pass  # decode() raises the error that says where
            else:
                if end == len(text):
                    return parsed
        elif text[:1] == "\ufeff":
            text = text[1:]
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None


def _excerpt(raw: bytes) -> str:
    # A UTF-8 character is at most 4 bytes: decode no more than the excerpt can hold.
    return raw[: 4 * MAX_BODY_EXCERPT].decode("utf-8", "replace")[:MAX_BODY_EXCERPT]


def error_body(raw: bytes, *, expect_json: bool = True) -> object:
    """What an error keeps of a response body: bounded, and never raising.

    The parsed JSON when ``expect_json`` and ``raw`` is valid JSON of at most
    `MAX_PARSED_BODY` bytes; otherwise the first `MAX_BODY_EXCERPT` characters as text.

    Example::

        error_body(b'{"error": {"message": "no"}}')  # {'error': {'message': 'no'}}
        error_body(b"<html>502</html>", expect_json=False)  # '<html>502</html>'
    """
    if expect_json and len(raw) <= MAX_PARSED_BODY:
        try:
            return parse_json(raw)
        except ValueError:
            pass
    return _excerpt(raw)


_TAG = re.compile(r"<[^>]+>")
# Newlines and control characters in a server's text would break a log line in two.
_SPACE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_MAX_MESSAGE = 300

# Depth- and size-limited, so a summary of a body of any shape stays short and cannot
# recurse without bound.
_SUMMARY = reprlib.Repr()
_SUMMARY.maxlevel = 3
_SUMMARY.maxstring = 120
_SUMMARY.maxother = 60


def short_repr(value: object, limit: int = 80) -> str:
    """A repr of at most ``limit`` characters that cannot fail, however deep ``value`` is."""
    try:
        shown = _SUMMARY.repr(value)
    except Exception:
        # A value whose own repr() fails is still named in the message.
        shown = f"<{type(value).__name__} object>"
    return shorten(shown, limit)


def shorten(text: str, limit: int = 80) -> str:
    """``text``, cut to at most ``limit`` characters with "..." where it was cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message_text(body: object) -> str:
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            message = error.get("message")
            if isinstance(message, str) and message.strip():
                return message
        elif isinstance(error, str) and error.strip():
            return error
        for key in ("message", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return value
        return _SUMMARY.repr(dict(body))
    if isinstance(body, str):
        page = body[: 2 * MAX_BODY_EXCERPT]
        # A proxy's HTML page: its <title> is the useful part ("502 Bad Gateway").
        title = _TITLE.search(page)
        return html.unescape(title.group(1) if title else _TAG.sub(" ", page))
    if body is None:
        return ""
    return _SUMMARY.repr(body)


def _clip(text: str, limit: int) -> str:
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message_from_body(status: int, body: object) -> str:
    """Best human-readable message in an error body, whatever shape the server used."""
    try:
        text = _clip(_message_text(body), _MAX_MESSAGE)
    except Exception:
        # Building an error must not raise, whatever object it was given.
        text = ""
    if text:
        return text
    if body is None or (isinstance(body, str) and not body.strip()):
        return f"HTTP {status} with an empty body"
    return f"HTTP {status}"


def error_for_status(
    status: int,
    body: object,
    *,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
    retry_after: float | None = None,
    attempts: int = 1,
) -> APIStatusError:
    """Build the typed error for an HTTP error ``status`` and its parsed ``body``.

    Example::

        exc = error_for_status(404, {"error": {"message": "no such model"}})
        assert isinstance(exc, NotFoundError)
    """
    message = f"Error code: {status} - {_message_from_body(status, body)}"
    if status == 429:
        return RateLimitError(
            message,
            body=body,
            request_id=request_id,
            headers=headers,
            attempts=attempts,
            retry_after=retry_after,
        )
    cls = _STATUS_CLASSES.get(status)
    if cls is None:
        cls = InternalServerError if status >= 500 else APIStatusError
    return cls(
        message,
        status_code=status,
        body=body,
        request_id=request_id,
        headers=headers,
        attempts=attempts,
    )


def _aiohttp_error_class(exc_type: type[BaseException]) -> type[APIError]:
    """Which of our classes an aiohttp (or asyncio) exception type becomes."""
    # Timeouts first: aiohttp's timeout errors also inherit from connection errors.
    # asyncio.TimeoutError is TimeoutError (3.11+); aiohttp's timeouts all subclass it.
    if issubclass(exc_type, TimeoutError):
        return APITimeoutError
    return APIConnectionError


# Belt and braces for exception text we pass on: credential-shaped pieces are masked
# even though none of aiohttp's own messages should carry our request's headers.
_CREDENTIALS = (
    # An Authorization value: "Bearer sk-...", "Basic dXNl...".
    re.compile(r"(?i)\b(bearer|basic)(\s+)[\w.~+/=-]{8,}"),
    # A header or query parameter that holds a key: "X-Api-Key: sk-...", "?api_key=...".
    re.compile(
        r"(?i)\b(authorization|proxy-authorization|cookie|[\w-]*api[-_]?key|[\w-]*token)"
        r"(['\"]?\s*[:=]\s*['\"]?)[^\s'\",;&}\]]+"
    ),
    # user:password@ in a URL.
    re.compile(r"(://)()[^/\s@'\"]+(?=@)"),
)


def _scrub(text: str) -> str:
    for pattern in _CREDENTIALS:
        text = pattern.sub(r"\1\2<redacted>", text)
    return text


def _describe(exc: BaseException) -> str:
    """``TypeName: what happened``, with nothing of our request's headers in it."""
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        # Raised by aiohttp itself (redirect loops, bad content) rather than an answer we
        # read: its repr holds our request's headers, Authorization included, so only
        # the status goes.
        return f"{name}: HTTP {exc.status}"
    if isinstance(exc, aiohttp.ServerDisconnectedError) and not isinstance(exc.message, str):
        # The half-read response it carries is the server's, and long.
        return f"{name}: the server closed the connection mid-response"
    try:
        if isinstance(exc, aiohttp.InvalidURL):
            # Its text starts with the URL, which may carry a password or a key.
            description = getattr(exc, "description", None)
            text = description if isinstance(description, str) else ""
        else:
            text = str(exc)
    except Exception:
        # An exception whose own str() fails still gets a message.
        text = ""
    text = _clip(_scrub(text), _MAX_MESSAGE)
    return f"{name}: {text}" if text else name


def translate_aiohttp_error(exc: BaseException, *, url: str, attempts: int = 1) -> APIError:
    """Turn an aiohttp/OS/timeout exception raised by one attempt into our error.

    ``url`` must already be stripped of credentials. The message is complete on its
    own (the URL, the exception's type and what it said) and never contains header
    values or credentials, so it can be raised ``from None``.

    Example::

        try:
            ...
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise translate_aiohttp_error(exc, url=url) from None
    """
    detail = _describe(exc)
    if _aiohttp_error_class(type(exc)) is APITimeoutError:
        return APITimeoutError(f"Request to {url} timed out ({detail})", attempts=attempts)
    return APIConnectionError(f"Connection error talking to {url}: {detail}", attempts=attempts)

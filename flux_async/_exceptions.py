"""Every error flux-async raises, and the one place aiohttp's errors become ours.

The tree::

    FluxError
    ├── ValidationError            (also a ValueError) bad input, raised before any I/O
    ├── ClientClosedError          (also a RuntimeError) the client was used after aclose()
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
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping

import aiohttp

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ClientClosedError",
    "ConflictError",
    "DeadlineExceededError",
    "FluxError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "UnprocessableEntityError",
    "ValidationError",
    "error_for_status",
    "translate_aiohttp_error",
]


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
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field}={shown} is not allowed: {allowed}")


class ClientClosedError(FluxError, RuntimeError):
    """The client was used after ``aclose()``: create a new `FluxClient` instead.

    Example::

        await client.aclose()
        await client.generate("x")   # raises ClientClosedError
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

    ``status_code`` is the HTTP status, ``body`` the parsed JSON error body (or the raw
    text when the body was not JSON, e.g. a proxy's HTML page), ``request_id`` the
    server's ``x-request-id`` when it sent one.

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

    ``body`` is what the server sent. Not retried: the server may already have billed it.

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

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _message_from_body(status: int, body: object) -> str:
    """Best human-readable message in an error body, whatever shape the server used."""
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
        if isinstance(body.get("detail"), str):
            return str(body["detail"])
        return str(dict(body))[:300]
    if isinstance(body, str) and body.strip():
        # A proxy's HTML page: its <title> is the useful part ("502 Bad Gateway").
        title = _TITLE.search(body)
        text = title.group(1) if title else _TAG.sub(" ", body)
        text = _SPACE.sub(" ", html.unescape(text)).strip()
        return text[:300] if text else f"HTTP {status}"
    return f"HTTP {status} with an empty body"


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


def translate_aiohttp_error(exc: BaseException, *, url: str, attempts: int = 1) -> APIError:
    """Turn an aiohttp/OS/timeout exception raised by one attempt into our error.

    ``url`` must already be stripped of credentials; the message never contains headers.

    Example::

        try:
            ...
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise translate_aiohttp_error(exc, url=url) from exc
    """
    cls = _aiohttp_error_class(type(exc))
    if cls is APITimeoutError:
        return APITimeoutError(f"Request to {url} timed out", attempts=attempts)
    if isinstance(exc, aiohttp.ClientResponseError):
        # Raised by aiohttp itself (redirect loops, bad content) rather than an answer we
        # read: its own str() can include the request's headers, so only the status goes.
        detail = f"HTTP {exc.status} ({type(exc).__name__})"
    else:
        detail = str(exc) or type(exc).__name__
    return APIConnectionError(f"Connection error talking to {url}: {detail}", attempts=attempts)

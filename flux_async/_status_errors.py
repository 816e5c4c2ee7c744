"""The typed error for an answer with an error status, with a note saying what to check
when the status points at the client's own settings (401, 403, 404).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ._client_settings import ENV_API_KEY, ClientSettings
from ._exceptions import APIError, error_body, error_for_status
from ._retry import parse_retry_after

__all__ = ["status_error", "status_errors"]

_JSON_TYPES = ("application/json", "application/problem+json")


def status_error(
    status: int,
    raw: bytes,
    headers: Mapping[str, str],
    request_id: str | None,
    key_sent: bool,
    url: str,
    model: str,
) -> APIError:
    """The error for ``status`` and its body ``raw``; never raises, whatever the body.

    ``key_sent``, ``url`` (without credentials) and ``model`` (the client's) go into the
    note of a 401, 403 or 404.

    Example::

        status_error(404, b"", {}, None, True, client_url, "flux-dev")
    """
    retry_after = parse_retry_after(headers)
    content_type = headers.get("Content-Type", "").lower()
    # Bounded and never raising, whatever the server sent (see APIStatusError.body).
    body = error_body(raw, expect_json=content_type.startswith(_JSON_TYPES) or raw[:1] == b"{")
    error = error_for_status(
        status, body, headers=headers, request_id=request_id, retry_after=retry_after
    )
    note = _what_to_check(status, key_sent, url, model)
    if note is not None:
        error.add_note(note)
    return error


def status_errors(
    settings: ClientSettings, model: Callable[[], str]
) -> Callable[[int, bytes, Mapping[str, str], str | None], APIError]:
    """The `status_error` of a client with these ``settings``, whose model is ``model()``
    when the answer comes: what its `CallContext` gets.

    Example::

        make = status_errors(settings, lambda: client.model)
        make(404, b"", {}, None)  # NotFoundError, with a note on base_url
    """
    key_sent = settings.api_key is not None
    url = settings.safe_url

    def make(
        status: int, raw: bytes, headers: Mapping[str, str], request_id: str | None
    ) -> APIError:
        return status_error(status, raw, headers, request_id, key_sent, url, model())

    return make


def _what_to_check(status: int, key_sent: bool, url: str, model: str) -> str | None:
    if status == 401 and not key_sent:
        return f"No API key was sent: pass api_key= to FluxClient or set ${ENV_API_KEY}."
    if status == 401:
        return (
            f"The API key was refused: check api_key= / ${ENV_API_KEY}, and that "
            f"{url} is the provider the key belongs to."
        )
    if status == 403:
        return (
            "The key may not use this endpoint or model: check the key's access and "
            f"model= (this request's model, or the client's {model!r})."
        )
    if status == 404 and "/v1/" not in url:
        return f"Check base_url: calls go to {url}; OpenAI-style base URLs end in /v1."
    if status == 404:
        return (
            f"Check base_url: calls go to {url}, which this server does not serve (is its "
            "path prefix right, e.g. /api/v1 or /openai/v1?); some gateways answer 404 "
            f"for a model they do not have: check model= too ({model!r} by default)."
        )
    return None

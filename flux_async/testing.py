"""Test helpers for code built on flux-async; the pytest fixtures build on them.

`FluxMock` answers a `FluxClient` through a `MockTransport` the way the emulator would
(the same checks, the same kind of body), with no socket and no server, and lets a test
script the answers of the next requests. `FLUX_TEST_KEY` is the key the fixtures' emulator
requires and their client sends. The pytest fixtures (``flux_emulator``, ``flux_client``,
``flux_mock``) are in `flux_async.pytest_plugin`, registered when flux-async is installed.

Example::

    from flux_async import FluxClient, TransportResponse
    from flux_async.testing import FluxMock

    mock = FluxMock()
    mock.script(TransportResponse(503))  # the first request fails, its retry succeeds
    async with FluxClient(transport=mock.transport) as client:
        response = await client.generate("a fox")
    assert len(mock.requests) == 2
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Mapping

from ._exceptions import APIConnectionError
from ._transport import MockTransport, TransportRequest, TransportResponse
from .emulator._images import Images, success_body
from .emulator._validation import Invalid, parse_body, validate

__all__ = ["FLUX_TEST_KEY", "MOCK_HOST", "FluxMock"]

FLUX_TEST_KEY = "sk-flux-async-test"
"""The API key the fixtures' emulator requires and their client sends (a fake one)."""

MOCK_HOST = "flux-mock.invalid"
"""The host of the image URLs `FluxMock` answers with (``.invalid`` never resolves)."""

_Answer = TransportResponse | APIConnectionError


class FluxMock:
    """A fake images server behind a `MockTransport`: no sockets, no event-loop plumbing.

    Each request is recorded in ``requests`` (`TransportRequest` s, in arrival order;
    ``request.json()`` is the body). It gets the next answer queued with `script`, if any;
    otherwise it is answered as the emulator would: its body checked (a 400 with an
    OpenAI-style error naming the field when it is bad), then a 200 with ``n`` images
    (URLs on ``flux-mock.invalid``, or real PNGs with ``response_format="b64_json"``), each
    with a ``revised_prompt`` (the prompt without its input image URLs). With
    ``api_key``, a request that does not carry it gets a 401.

    Example::

        mock = FluxMock()
        client = FluxClient(transport=mock.transport, retry=RetryPolicy.for_tests())
        mock.script(TransportResponse(429, headers={"Retry-After": "1"}))
        response = await client.generate("a fox", n=2)
        assert len(response.data) == 2 and len(mock.requests) == 2
    """

    def __init__(self, *, api_key: str | None = None) -> None:
        self.requests: list[TransportRequest] = []
        self._api_key = api_key
        self._script: deque[_Answer] = deque()
        # Small: a test draws few distinct pictures, and b64 PNGs are the costly part.
        self._images = Images(maxsize=16)
        self.transport = MockTransport(self._answer)

    def script(self, *answers: _Answer) -> None:
        """Queue answers for the next requests, one each, in order: a `TransportResponse`,
        or an `APIConnectionError` (or `APITimeoutError`) to play a network failure.

        Example::

            mock.script(TransportResponse(503), APITimeoutError("slow"), TransportResponse(500))
        """
        for answer in answers:
            if not isinstance(answer, TransportResponse | APIConnectionError):
                raise TypeError(
                    "script() takes TransportResponse or APIConnectionError objects, "
                    f"got {type(answer).__name__}"
                )
        self._script.extend(answers)

    @property
    def prompts(self) -> list[str]:
        """The ``prompt`` of each request's body, in arrival order (as sent: input image
        URLs included).

        Example::

            assert mock.prompts == ["a fox"]
        """
        return [str(request.json().get("prompt")) for request in self.requests]

    def _answer(self, request: TransportRequest) -> TransportResponse:
        self.requests.append(request)
        if self._script:
            answer = self._script.popleft()
            if isinstance(answer, APIConnectionError):
                raise answer
            return answer
        if self._api_key is not None and not _bearer_is(request.headers, self._api_key):
            return _error(401, Invalid("Incorrect API key provided.", None, "invalid_api_key"))
        parsed = parse_body(request.body)
        try:
            if isinstance(parsed, Invalid):
                raise parsed
            job = validate(parsed, require_aspect_ratio=True)
        except Invalid as problem:
            return _error(problem.status, problem)
        body = success_body(MOCK_HOST, job, self._images)
        return TransportResponse(200, headers=_headers(), body=body)

    def __repr__(self) -> str:
        return f"<FluxMock requests={len(self.requests)} scripted={len(self._script)}>"


def _bearer_is(headers: Mapping[str, str], key: str) -> bool:
    return headers.get("Authorization") == f"Bearer {key}"


def _headers() -> dict[str, str]:
    # Every answer carries a request id, as the emulator's and real servers' do.
    return {"Content-Type": "application/json", "x-request-id": "req_" + os.urandom(12).hex()}


def _error(status: int, problem: Invalid) -> TransportResponse:
    """The OpenAI-style error answer the emulator gives for ``problem``."""
    error = {
        "message": problem.message,
        "type": "invalid_request_error",
        "param": problem.param,
        "code": problem.code,
    }
    return TransportResponse(status, headers=_headers(), body=json.dumps({"error": error}).encode())

"""The generation pipeline: what ``POST /v1/images/generations`` does, step by step.

A generation request goes through these steps in this order; the first step that answers
ends it:

1. **arrival** - count it, take ``time.monotonic()``, fingerprint the bearer key, read the body
   and, when recording, append a :class:`SeenRequest` (so ``emu.requests`` is in arrival order);
2. **scripted fault** - the next :class:`Fault` queued with :meth:`Emulator.script`, if any.
   ``Fault.slow`` waits and then carries on with step 3; every other kind answers here;
3. **auth** - 401 ``invalid_api_key`` when keys are configured and the bearer is missing or
   unknown;
4. **validation** - a 4xx ``invalid_request_error``: 413 for a body over 1 MiB, else 400
   (body unreadable, not UTF-8 text, not a JSON object, nested too deeply, a lone surrogate;
   then missing/ill-typed/out-of-range fields, naming ``param``); see :mod:`._validation`;
5. **replay** - only with ``dedupe_idempotency``: a repeated ``Idempotency-Key`` whose first
   request succeeded gets the stored response again (``Idempotent-Replayed: true``);
6. **rate capacity** - per key, GCRA at ``rate_limit`` requests/second with ``burst``: 429
   ``rate_limit_exceeded`` with ``retry-after-ms`` and ``Retry-After``; a rejected request
   consumes no capacity. Every answer for a rate-limited key (429 or success) carries
   OpenAI's ``x-ratelimit-limit-requests`` (the burst), ``x-ratelimit-remaining-requests``
   and ``x-ratelimit-reset-requests``;
7. **max in flight** - 429 ``concurrency_limit_exceeded`` with ``Retry-After: 1`` when
   ``max_in_flight`` generations are already running;
8. **latency** - ``asyncio.sleep``-like wait of ``latency`` seconds;
9. **random faults** - drawn from :class:`FaultRates` with ``random.Random(seed)``: slow first,
   then at most one of error, drop, malformed;
10. **success** - ``{"created": ..., "data": [...]}`` whose URLs the emulator itself serves at
    ``GET /v1/images/{w}x{h}/{seed}.png``.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import deque
from typing import Final

from aiohttp import web

from ._faults import MALFORMED_KINDS, Fault, FaultRates, malformed_body
from ._images import Images, success_body
from ._ratelimit import Gcra, quota_headers, rate_limited
from ._stats import COUNTERS, OUTCOME_COUNTER, EmulatorStats, Outcome, SeenRequest
from ._validation import Invalid, Job, read_body, validate
from ._wire import error_json, json_response, new_request_id

__all__ = ["ANONYMOUS", "Pipeline", "Waits", "key_id"]

ANONYMOUS: Final = "anonymous"
"""The key id of requests without a bearer key."""

# Bound once: attribute lookups on modules are measurable at thousands of requests a second.
_monotonic = time.monotonic
_sha256 = hashlib.sha256

_IMAGE_CACHE_SIZE: Final = 64
_REPLAY_CAPACITY: Final = 65536
_NO_KEY: Final = (
    "You didn't provide an API key. You need to provide your API key in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)

_Answer = tuple[web.StreamResponse, Outcome]


def key_id(key: str) -> str:
    """``"key-"`` + the first 8 hex digits of the key's SHA-256 (see :meth:`Emulator.key_id`)."""
    # surrogatepass: a bearer with bytes that are not UTF-8 arrives with escaped surrogates.
    return "key-" + _sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    if not authorization.startswith("Bearer ") and authorization[:7].lower() != "bearer ":
        return None
    return authorization[7:].strip() or None


def _drop(request: web.BaseRequest) -> web.Response:
    transport = request.transport
    if transport is not None:
        transport.close()
    # Never written: aiohttp sees the closed transport and quietly gives up on the connection.
    return web.Response()


def _wake(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)


class Waits:
    """``asyncio.sleep``-like waits that :meth:`close` cuts short, so close() never stalls."""

    __slots__ = ("_waiters", "closing")

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[bool]] = set()
        self.closing = False

    async def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; return False (at once, or when closed meanwhile) when closing."""
        if self.closing:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        handle = loop.call_later(seconds, _wake, waiter)
        self._waiters.add(waiter)
        try:
            return await waiter
        finally:
            handle.cancel()
            self._waiters.discard(waiter)

    def close(self) -> None:
        """End every wait now, and every later one at once, until :meth:`open`."""
        self.closing = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(False)

    def open(self) -> None:
        """Let waits last their time again."""
        self.closing = False


class Pipeline:
    """The steps of a generation request and the state they share (stats, script, limits).

    Built by :class:`Emulator` from its already checked arguments; ``handle`` is the aiohttp
    handler of ``POST /v1/images/generations``.
    """

    __slots__ = (
        "_active",
        "_dedupe",
        "_exclusive_rate",
        "_images",
        "_key_ids",
        "_latency",
        "_limiter",
        "_limits",
        "_max_in_flight",
        "_random_error",
        "_rates",
        "_record",
        "_replays",
        "_require_aspect_ratio",
        "_rng",
        "_seed",
        "requests",
        "script",
        "stats",
        "waits",
    )

    def __init__(
        self,
        *,
        key_ids: dict[str, str] | None,
        latency: float,
        limits: tuple[float, int] | None,
        max_in_flight: int | None,
        faults: FaultRates | None,
        seed: int,
        require_aspect_ratio: bool,
        dedupe_idempotency: bool,
        record_requests: bool,
    ) -> None:
        self._key_ids = key_ids
        self._latency = latency
        self._limits = limits
        self._limiter = None if limits is None else Gcra(*limits)
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
        self._images = Images(_IMAGE_CACHE_SIZE)
        self._replays: dict[tuple[str, str], tuple[bytes, str]] = {}
        self._active = 0
        self.script: deque[Fault] = deque()
        self.waits = Waits()
        self.stats = EmulatorStats()
        self.requests: list[SeenRequest] = []

    @property
    def images(self) -> Images:
        """The PNG caches, shared with the image route."""
        return self._images

    def reset(self) -> None:
        """See :meth:`Emulator.reset`."""
        self.stats._zero()
        self.requests.clear()
        self.script.clear()
        self._replays.clear()
        if self._limiter is not None:
            self._limiter.clear()
        self._rng.seed(self._seed)

    # -- 1. arrival -------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one generation request and count its outcome."""
        now = _monotonic()
        stats = self.stats
        stats.requests += 1
        in_flight = stats.in_flight + 1
        stats.in_flight = in_flight
        if in_flight > stats.max_in_flight_seen:
            stats.max_in_flight_seen = in_flight
        headers = request.headers
        kid, authorized = self._identify(headers.get("Authorization"))
        counts = stats.per_key.get(kid)
        if counts is None:
            counts = stats.per_key[kid] = dict.fromkeys(COUNTERS, 0)
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
        if not (outcome == "dropped" and self.waits.closing):
            counter = OUTCOME_COUNTER[outcome]
            setattr(stats, counter, getattr(stats, counter) + 1)
            counts[counter] += 1
        if seen is not None:
            seen.outcome = outcome
            seen.status = None if outcome == "dropped" else response.status
        return response

    def _identify(self, authorization: str | None) -> tuple[str, bool]:
        """The key id of the bearer, and whether it may generate."""
        key = _bearer(authorization)
        key_ids = self._key_ids
        if key is None:
            return ANONYMOUS, key_ids is None
        known = None if key_ids is None else key_ids.get(key)
        return known or key_id(key), key_ids is None or known is not None

    async def _process(
        self,
        request: web.Request,
        authorized: bool,
        kid: str,
        counts: dict[str, int],
        idempotency_key: str | None,
        seen: SeenRequest | None,
    ) -> _Answer:
        request_id = new_request_id()
        body = await read_body(request)
        if seen is not None and not isinstance(body, Invalid):
            seen.body = body
        # 2. scripted fault
        if self.script:
            fault = self.script.popleft()
            if fault.kind != "slow":
                return self._fault_response(request, fault, request_id)
            self._count_fault(counts)
            if not await self.waits.sleep(fault.seconds):
                return _drop(request), "dropped"
        # 3. auth
        if not authorized:
            message = _NO_KEY if kid == ANONYMOUS else f"Incorrect API key provided ({kid})."
            error = error_json(message, "invalid_request_error", None, "invalid_api_key")
            return json_response(401, error, request_id), "unauthorized"
        # 4. validation
        if isinstance(body, Invalid):
            return _bad_request(body, request_id), "bad_request"
        try:
            job = validate(body, self._require_aspect_ratio)
        except Invalid as exc:
            return _bad_request(exc, request_id), "bad_request"
        refused = self._admit(kid, idempotency_key, request_id)
        if refused is not None:
            return refused
        return await self._generate(request, job, kid, counts, idempotency_key, request_id)

    # -- 5.-7. replay and admission ---------------------------------------------------------

    def _admit(self, kid: str, idempotency_key: str | None, request_id: str) -> _Answer | None:
        """Answer a replay or a refusal (rate, concurrency); None admits the request."""
        if self._dedupe and idempotency_key is not None:
            stored = self._replays.get((kid, idempotency_key))
            if stored is not None:
                replay_headers = {"Idempotent-Replayed": "true"}
                return json_response(200, stored[0], stored[1], replay_headers), "replayed"
        limiter = self._limiter
        if limiter is not None:
            now = _monotonic()
            wait = limiter.acquire(kid, now)
            if wait > 0.0:
                assert self._limits is not None
                reset = limiter.quota(kid, now)[1]
                return rate_limited(kid, wait, self._limits, request_id, reset), "rate_limited"
        limit = self._max_in_flight
        if limit is not None and self._active >= limit:
            message = f"Too many concurrent requests for this server (limit {limit})."
            error = error_json(message, "requests", None, "concurrency_limit_exceeded")
            headers = {"Retry-After": "1"}
            return json_response(429, error, request_id, headers), "concurrency_limited"
        return None

    # -- 8.-10. latency, random faults, success ---------------------------------------------

    async def _generate(
        self,
        request: web.Request,
        job: Job,
        kid: str,
        counts: dict[str, int],
        idempotency_key: str | None,
        request_id: str,
    ) -> _Answer:
        self._active += 1
        try:
            if self._latency and not await self.waits.sleep(self._latency):
                return _drop(request), "dropped"
            if self._rates is not None:
                faulted = await self._random_fault(request, self._rates, counts, request_id)
                if faulted is not None:
                    return faulted
            body = success_body(request.host, job, self._images)
            if self._dedupe and idempotency_key is not None:
                replays = self._replays
                if len(replays) >= _REPLAY_CAPACITY:
                    del replays[next(iter(replays))]
                replays[(kid, idempotency_key)] = (body, request_id)
            limiter = self._limiter
            if limiter is None:
                return json_response(200, body, request_id), "success"
            # As OpenAI does: the key's quota as it stands when the answer leaves.
            assert self._limits is not None
            quota = quota_headers(self._limits[1], *limiter.quota(kid, _monotonic()))
            return json_response(200, body, request_id, quota), "success"
        finally:
            self._active -= 1

    def _count_fault(self, counts: dict[str, int]) -> None:
        self.stats.faults += 1
        counts["faults"] += 1

    def _fault_response(self, request: web.Request, fault: Fault, request_id: str) -> _Answer:
        if fault.kind == "drop":
            return _drop(request), "dropped"
        if fault.kind == "malformed":
            return json_response(200, malformed_body(fault.variant), request_id), "fault"
        headers = {"Content-Type": fault.content_type, "x-request-id": request_id}
        headers.update(fault.headers)
        return web.Response(status=fault.code, body=fault.body, headers=headers), "fault"

    async def _random_fault(
        self, request: web.Request, rates: FaultRates, counts: dict[str, int], request_id: str
    ) -> _Answer | None:
        rng = self._rng
        if rates.slow_rate and rng.random() < rates.slow_rate:
            self._count_fault(counts)
            if not await self.waits.sleep(rates.slow_seconds):
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
            body = malformed_body(rng.choice(MALFORMED_KINDS))
            return json_response(200, body, request_id), "fault"
        return None


def _bad_request(problem: Invalid, request_id: str) -> web.Response:
    error = error_json(problem.message, "invalid_request_error", problem.param, problem.code)
    response = json_response(problem.status, error, request_id)
    if problem.close:
        response.force_close()
    return response

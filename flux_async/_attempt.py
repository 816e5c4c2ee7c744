"""One call and its attempts: the per-request path every prompt of a batch runs.

A *call* sends one request body (one chunk of at most 10 images) until it succeeds or
the `RetryPolicy` gives up; an *attempt* is one HTTP exchange. The path of one attempt
(``docs/design.md``, "The path of one prompt")::

    outage guard     wait while the server looks down (only when it does)
    slot             a fan-out's concurrency slot, held only while on the wire
    limiter          the pause gate, then a pacing permit
    POST             the body read under a size cap
    report           limiter, outage guard and retry budget learn what happened
    decide           return, retry after `decide_retry`'s wait, or raise a typed error

Nothing is held across a backoff sleep. Everything a call needs from its client comes
in one frozen `CallContext`, so this module never reaches into the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import attrs

from ._config import Timeout
from ._counters import Counters
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    ClientClosedError,
    DeadlineExceededError,
    RateLimitError,
)
from ._limits import ConcurrencyLimit, Limiter
from ._models import MAX_N_PER_REQUEST, ImageRequest, ImagesResponse
from ._outage import FREE_PROBE_FAILURES, OutageGuard
from ._quota import REMAINING_HEADER, parse_quota
from ._retry import RetryBudget, RetryDecision, RetryPolicy, decide_retry
from ._transport import (
    DEFAULT_MAX_RESPONSE_BYTES,
    AsyncTransport,
    RequestHeaders,
    TransportRequest,
    TransportResponse,
)

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "CallContext",
    "response_cap",
    "run_request",
]

logger = logging.getLogger("flux_async")

#: With ``response_format="b64_json"`` the images are inside the answer: this much more
#: per image (a 2048x2048 PNG is about 8 MB as base64).
B64_BYTES_PER_IMAGE = 24 * 2**20


def response_cap(request: ImageRequest, n: int | None, max_bytes: int | None) -> int:
    """The most bytes read from one answer to ``request`` (or its chunk of ``n`` images).

    Example::

        response_cap(ImageRequest(prompt="x"), None, None)  # 4 MiB
    """
    if max_bytes is not None:
        return max_bytes
    if request.response_format == "b64_json":
        return DEFAULT_MAX_RESPONSE_BYTES + B64_BYTES_PER_IMAGE * (request.n if n is None else n)
    return DEFAULT_MAX_RESPONSE_BYTES


@attrs.frozen(kw_only=True)
class CallContext:
    """What every call of one client shares, fixed when the client is made.

    * ``url``: where calls go; ``label`` is ``"POST <url>"`` without credentials or
      query, for logs and errors;
    * ``transport``: sends each attempt;
    * ``headers``: the headers every request carries (an ``Idempotency-Key`` is added
      per call);
    * ``is_closed``: whether the client has been closed (checked before each retry);
    * ``new_key``: makes an ``Idempotency-Key`` for a call that was given none;
    * ``limiter``, ``budget``, ``outage``: the client's defaults, shared by its calls;
    * ``status_error``: builds the typed error for an error status;
    * ``max_response_bytes``: the body cap, or None for `response_cap`'s defaults;
    * ``check_loop``: raises `EventLoopError` when the client is busy in another event
      loop (called as each call starts, before the limiter or the pool is touched).
    """

    url: str
    label: str
    transport: AsyncTransport
    headers: Mapping[str, str]
    is_closed: Callable[[], bool]
    new_key: Callable[[], str]
    limiter: Limiter
    budget: RetryBudget
    outage: OutageGuard
    status_error: Callable[[int, bytes, Mapping[str, str], str | None], APIError]
    max_response_bytes: int | None = None
    check_loop: Callable[[], None] = attrs.field(default=lambda: None)


def run_request(
    ctx: CallContext,
    request: ImageRequest,
    policy: RetryPolicy,
    timeout: Timeout,
    idempotency_key: str | None,
    slot: ConcurrencyLimit | None = None,
    limiter: Limiter | None = None,
    counters: Counters | None = None,
) -> Coroutine[Any, Any, tuple[ImagesResponse, int]]:
    """One request, split into calls of at most 10 images: (response, attempts sent).

    Not itself a coroutine: a request of one call (the common case) is that call's own
    coroutine, so a fan-out prompt costs no extra frame.
    """
    if request.n <= MAX_N_PER_REQUEST:
        return Call(
            ctx, request, None, policy, timeout, idempotency_key, slot, limiter, counters
        ).run()
    return _run_chunks(ctx, request, policy, timeout, idempotency_key, slot, limiter, counters)


async def _run_chunks(
    ctx: CallContext,
    request: ImageRequest,
    policy: RetryPolicy,
    timeout: Timeout,
    idempotency_key: str | None,
    slot: ConcurrencyLimit | None,
    limiter: Limiter | None,
    counters: Counters | None,
) -> tuple[ImagesResponse, int]:
    """A request for more than 10 images: its calls run concurrently, images joined."""
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(
            Call(
                ctx,
                request,
                size,
                policy,
                timeout,
                None if idempotency_key is None else f"{idempotency_key}-{i}",
                slot,
                limiter,
                counters,
            ).run()
        )
        for i, size in enumerate(request.chunks())
    ]
    try:
        # Not a TaskGroup: its ExceptionGroup would hide the typed error a caller
        # catches. The first chunk to fail for good fails the request; the others
        # are cancelled and awaited, so nothing outlives the call.
        parts = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return ImagesResponse.join([p[0] for p in parts]), sum(p[1] for p in parts)


class Call:
    """One logical call: its body and headers, built once, and the attempts that send it.

    `run` makes the first attempt bare and builds the retry machinery only when it
    fails, so the common case costs one coroutine frame per request.
    """

    __slots__ = (
        "attempts",
        "counters",
        "ctx",
        "free_probes",
        "limiter",
        "policy",
        "request",
        "slot",
        "uncounted",
    )

    def __init__(
        self,
        ctx: CallContext,
        request: ImageRequest,
        n: int | None,
        policy: RetryPolicy,
        timeout: Timeout,
        idempotency_key: str | None,
        slot: ConcurrencyLimit | None,
        limiter: Limiter | None,
        counters: Counters | None,
    ) -> None:
        if ctx.is_closed():
            raise ClientClosedError("this FluxClient is closed; create a new one")
        ctx.check_loop()
        self.ctx = ctx
        # Built once: every attempt of the call sends exactly the same request.
        self.request = TransportRequest(
            method="POST",
            url=ctx.url,
            headers=RequestHeaders(
                ctx.headers, {"Idempotency-Key": idempotency_key or ctx.new_key()}
            ),
            body=request.to_bytes(n),
            timeout=timeout,
            max_response_bytes=response_cap(request, n, ctx.max_response_bytes),
        )
        self.limiter = ctx.limiter if limiter is None else limiter
        self.policy = policy
        self.slot = slot
        self.counters = counters
        #: Attempts sent so far (an attempt held at a gate and cancelled is not one).
        self.attempts = 0
        #: Failed outage probes that did not count against max_attempts, and whether the
        #: last failure was one of them.
        self.free_probes = 0
        self.uncounted = False

    async def run(self) -> tuple[ImagesResponse, int]:
        """Attempts until success or the policy gives up: (response, attempts sent)."""
        deadline = self.policy.deadline
        if deadline is None:
            try:
                response = await self.attempt()
            except APIError as exc:
                response = await self._retry(exc, None)
            else:
                self.ctx.budget.on_success()
            return response, self.attempts
        loop = asyncio.get_running_loop()
        deadline_at = loop.time() + deadline
        try:
            async with asyncio.timeout_at(deadline_at):
                try:
                    response = await self.attempt()
                except APIError as exc:
                    response = await self._retry(exc, deadline_at)
                else:
                    self.ctx.budget.on_success()
        except TimeoutError:
            raise self._deadline_error(None) from None
        return response, self.attempts

    async def _retry(self, exc: APIError, deadline_at: float | None) -> ImagesResponse:
        """Carry on after a failed attempt, as `decide_retry` says, until one succeeds."""
        policy = self.policy
        budget = self.ctx.budget
        loop = asyncio.get_running_loop()
        failures = rate_limited = 0
        spent = 0.0
        while True:
            if isinstance(exc, RateLimitError):
                rate_limited += 1
            elif self.uncounted:
                # A failed outage probe: sent for every held prompt, charged to none.
                self.uncounted = False
            else:
                failures += 1
            remaining = None if deadline_at is None else deadline_at - loop.time()
            decision = decide_retry(
                policy, exc, failures=failures, rate_limited=rate_limited, remaining=remaining
            )
            if not decision.retry:
                raise self._final(exc, decision)
            probe = False
            cost = budget.cost(exc)
            if cost:
                if budget.try_pay(cost):
                    spent += cost
                elif self.counters is None:
                    exc.add_note(
                        "Not retried: the client's retry budget is empty (too many "
                        "failures recently); see RetryBudget."
                    )
                    raise self._final(exc, None)
                else:
                    # A fan-out waits for the budget instead of failing the prompt.
                    paid = await budget.pay_or_probe(cost)
                    spent += paid
                    probe = not paid
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "%s: retrying attempt %d (%s) in %.2fs",
                    self.ctx.label,
                    self.attempts,
                    decision.reason,
                    decision.wait,
                )
            try:
                await self._sleep(decision.wait)
                if self.ctx.is_closed():
                    raise ClientClosedError("this FluxClient was closed while a call was running")
                response = await self.attempt()
            except APIError as next_exc:
                exc = next_exc
                continue
            finally:
                if probe:
                    budget.end_probe()
            budget.on_success(refund=spent)
            return response

    def _final(self, exc: APIError, decision: RetryDecision | None) -> APIError:
        """The error a call ends with, its ``attempts`` set to what was really sent."""
        exc.attempts = self.attempts
        if decision is None:
            return exc
        if decision.deadline and not (
            isinstance(exc, RateLimitError) and exc.retry_after is not None
        ):
            error = self._deadline_error(exc)
            error.__cause__ = exc
            return error
        if self.policy.is_retryable(exc):
            # It stopped for a limit, not for its kind: say which.
            exc.add_note(f"Not retried: {decision.reason}.")
        return exc

    def _deadline_error(self, last: APIError | None) -> DeadlineExceededError:
        tail = f"; last error: {last}" if last is not None else ""
        return DeadlineExceededError(
            f"{self.ctx.label}: deadline of {self.policy.deadline}s passed after "
            f"{self.attempts} attempt(s){tail}",
            attempts=self.attempts,
        )

    async def _sleep(self, seconds: float) -> None:
        if not seconds > 0 or self.policy.testing:
            # Still yield to the loop, so a test policy that never sleeps lets others run.
            await asyncio.sleep(0)
            return
        counters = self.counters
        if counters is None:
            await asyncio.sleep(seconds)
            return
        # Tell the fan-out this worker is off the wire for a while.
        counters.on_backoff(1)
        try:
            await asyncio.sleep(seconds)
        finally:
            counters.on_backoff(-1)

    async def attempt(self) -> ImagesResponse:
        """One HTTP attempt: outage guard, slot, permit, POST, then the answer or an error."""
        outage = self.ctx.outage
        # A testing policy never waits, here as in backoff.
        if outage.is_open and not self.policy.testing:
            probe = await outage.enter(self._rank())
        else:
            probe = False
        try:
            answer = await self._exchange()
        except APIConnectionError:
            outage.on_failure(probe, retry=self.attempts > 1)
            if probe:
                self._probe_failed()
            raise
        except BaseException:
            if probe:
                outage.abandon_probe()
            raise
        status = answer.status
        headers = answer.headers
        request_id = headers.get("x-request-id")
        if REMAINING_HEADER in headers and not self.policy.testing:
            # The server states its quota: the limiter paces by it instead of learning
            # it from 429s (a testing policy never waits, so it is not told).
            quota = parse_quota(headers)
            if quota is not None:
                self.limiter.on_quota(*quota)
        if status < 300:
            outage.on_success(probe)
            self.limiter.on_success()
            if answer.truncated:
                raise APIResponseValidationError(
                    f"The server answered {status} with a body over "
                    f"{self.request.max_response_bytes} bytes (max_response_bytes); "
                    "it was not read",
                    request_id=request_id,
                    attempts=self.attempts,
                )
            return ImagesResponse.from_bytes(answer.body, request_id=request_id)
        if status >= 500:
            outage.on_failure(probe, retry=self.attempts > 1)
            if probe:
                self._probe_failed()
        else:
            outage.on_success(probe)
        error = self.ctx.status_error(status, answer.body, headers, request_id)
        error.attempts = self.attempts
        if isinstance(error, RateLimitError):
            if self.counters is not None:
                self.counters.rate_limited += 1
            # A testing policy leaves the limiter alone: told of a 429, it would pause or
            # pace the test. No header may shut the gate for longer than retry_after_max.
            if not self.policy.testing:
                retry_after = error.retry_after
                if retry_after is not None:
                    retry_after = min(retry_after, self.policy.retry_after_max)
                self.limiter.on_rate_limited(retry_after)
        raise error

    def _rank(self) -> int:
        """Where this call stands in the outage guard's line for the next probe: calls
        that have sent more attempts go first, unless their free probes are used up."""
        return self.attempts if self.free_probes < FREE_PROBE_FAILURES else -1

    def _probe_failed(self) -> None:
        if self.free_probes < FREE_PROBE_FAILURES:
            self.free_probes += 1
            self.uncounted = True

    async def _exchange(self) -> TransportResponse:
        """Slot, permit, then one exchange through the transport."""
        slot = self.slot
        limiter = self.limiter
        counters = self.counters
        if slot is not None and not slot.try_acquire():
            await slot.acquire()
        try:
            if not limiter.try_acquire():
                await limiter.acquire()
            if counters is not None:
                if counters.halted is not None:
                    # The fan-out stopped on a fatal answer (a wrong key) while this call
                    # waited: sending it would only get the same answer.
                    raise counters.halted(self.attempts)
                counters.in_flight += 1
            self.attempts += 1
            try:
                return await self.ctx.transport.send(self.request)
            finally:
                if counters is not None:
                    counters.in_flight -= 1
        finally:
            if slot is not None:
                slot.release()

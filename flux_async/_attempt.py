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
from collections.abc import Callable, Mapping

import aiohttp
import attrs
import yarl

from ._counters import Counters
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    DeadlineExceededError,
    RateLimitError,
    translate_aiohttp_error,
)
from ._limits import ConcurrencyLimit, Limiter
from ._models import ImageRequest, ImagesResponse
from ._outage import OutageGuard
from ._retry import RetryBudget, RetryDecision, RetryPolicy, decide_retry

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "CallContext",
    "response_cap",
    "run_request",
]

logger = logging.getLogger("flux_async")

#: Bytes of one JSON answer read at most when images come as URLs: a real answer is a
#: few hundred bytes, so this only stops a broken or hostile server from filling memory.
DEFAULT_MAX_RESPONSE_BYTES = 4 * 2**20
#: With ``response_format="b64_json"`` the images are inside the answer: this much more
#: per image (a 2048x2048 PNG is about 8 MB as base64).
B64_BYTES_PER_IMAGE = 24 * 2**20
#: Bytes of an error body kept to build the error from; the rest is not read.
_ERROR_BODY_BYTES = 64 * 2**10


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

    * ``url``: where calls go; ``safe_url`` the same without credentials or query, and
      ``label`` ``"POST <safe_url>"``, for logs and errors;
    * ``session``: returns the client's pool (made lazily; raises `ClientClosedError`
      once the client is closed);
    * ``headers``: headers each request must carry itself (None when the session
      already carries them);
    * ``new_key``: makes an ``Idempotency-Key`` for a call that was given none;
    * ``limiter``, ``budget``, ``outage``: the client's defaults, shared by its calls;
    * ``status_error``: builds the typed error for an error status;
    * ``max_response_bytes``: the body cap, or None for `response_cap`'s defaults.
    """

    url: yarl.URL
    safe_url: str
    label: str
    session: Callable[[], aiohttp.ClientSession]
    headers: Mapping[str, str] | None
    new_key: Callable[[], str]
    limiter: Limiter
    budget: RetryBudget
    outage: OutageGuard
    status_error: Callable[[int, bytes, Mapping[str, str], str | None], APIError]
    max_response_bytes: int | None = None


async def run_request(
    ctx: CallContext,
    request: ImageRequest,
    policy: RetryPolicy,
    timeout: aiohttp.ClientTimeout,
    idempotency_key: str | None,
    slot: ConcurrencyLimit | None = None,
    limiter: Limiter | None = None,
    counters: Counters | None = None,
) -> tuple[ImagesResponse, int]:
    """One request, split into calls of at most 10 images: (response, attempts sent)."""
    chunks = request.chunks()
    if len(chunks) == 1:
        return await Call(
            ctx, request, None, policy, timeout, idempotency_key, slot, limiter, counters
        ).run()
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
        for i, size in enumerate(chunks)
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
        "body",
        "cap",
        "counters",
        "ctx",
        "headers",
        "limiter",
        "policy",
        "slot",
        "timeout",
    )

    def __init__(
        self,
        ctx: CallContext,
        request: ImageRequest,
        n: int | None,
        policy: RetryPolicy,
        timeout: aiohttp.ClientTimeout,
        idempotency_key: str | None,
        slot: ConcurrencyLimit | None,
        limiter: Limiter | None,
        counters: Counters | None,
    ) -> None:
        self.ctx = ctx
        self.body = request.to_bytes(n)
        key = idempotency_key or ctx.new_key()
        if ctx.headers is None:
            self.headers: Mapping[str, str] = {"Idempotency-Key": key}
        else:
            self.headers = {**ctx.headers, "Idempotency-Key": key}
        self.limiter = ctx.limiter if limiter is None else limiter
        self.policy = policy
        self.timeout = timeout
        self.slot = slot
        self.counters = counters
        self.cap = response_cap(request, n, ctx.max_response_bytes)
        #: Attempts sent so far (an attempt held at a gate and cancelled is not one).
        self.attempts = 0

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
        if not (seconds > 0 and self.policy.wait):
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
        # A test-mode policy never waits, here as in backoff.
        probe = await outage.enter() if outage.is_open and self.policy.wait else False
        try:
            status, raw, headers = await self._exchange()
        except APIConnectionError:
            outage.on_failure(probe)
            raise
        except BaseException:
            if probe:
                outage.abandon_probe()
            raise
        request_id = headers.get("x-request-id")
        if status < 300:
            outage.on_success(probe)
            self.limiter.on_success()
            if raw is None:
                raise APIResponseValidationError(
                    f"The server answered {status} with a body over {self.cap} bytes "
                    "(max_response_bytes); it was not read",
                    request_id=request_id,
                    attempts=self.attempts,
                )
            return ImagesResponse.from_bytes(raw, request_id=request_id)
        if status >= 500:
            outage.on_failure(probe)
        else:
            outage.on_success(probe)
        error = self.ctx.status_error(status, raw or b"", headers, request_id)
        error.attempts = self.attempts
        if isinstance(error, RateLimitError):
            if self.counters is not None:
                self.counters.rate_limited += 1
            # A test-mode policy never waits, so the limiter is not told to pause or slow
            # down. No header may shut the gate for longer than retry_after_max.
            if self.policy.wait:
                retry_after = error.retry_after
                if retry_after is not None:
                    retry_after = min(retry_after, self.policy.retry_after_max)
                self.limiter.on_rate_limited(retry_after)
        raise error

    async def _exchange(self) -> tuple[int, bytes | None, Mapping[str, str]]:
        """Slot, permit, POST and read: (status, body or None if over the cap, headers)."""
        slot = self.slot
        limiter = self.limiter
        counters = self.counters
        session = self.ctx.session()
        if slot is not None and not slot.try_acquire():
            await slot.acquire()
        try:
            if not limiter.try_acquire():
                await limiter.acquire()
            if counters is not None:
                counters.in_flight += 1
            self.attempts += 1
            failure: BaseException | None = None
            try:
                async with session.post(
                    self.ctx.url, data=self.body, headers=self.headers, timeout=self.timeout
                ) as resp:
                    status = resp.status
                    headers = resp.headers
                    length = resp.content_length
                    if (
                        length is not None
                        and length <= self.cap
                        and "Content-Encoding" not in headers
                    ):
                        raw: bytes | None = await resp.read()
                    else:
                        raw = await _read_capped(
                            resp, self.cap if status < 300 else _ERROR_BODY_BYTES, status
                        )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                failure = exc
            finally:
                if counters is not None:
                    counters.in_flight -= 1
        finally:
            if slot is not None:
                slot.release()
        if failure is not None:
            # Raised here, outside the except block, so the error carries no __context__:
            # aiohttp's exceptions can hold our request headers, Authorization included.
            raise translate_aiohttp_error(failure, url=self.ctx.safe_url)
        return status, raw, headers


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, status: int) -> bytes | None:
    """Read at most ``cap`` bytes (after decompression). Over the cap: None for a 2xx,
    whose body is useless cut short, else the first ``cap`` bytes, for the error."""
    length = resp.content_length
    if length is not None and length > cap and "Content-Encoding" not in resp.headers:
        return None if status < 300 else await resp.content.read(cap)
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap:
            if status < 300:
                return None
            parts.append(chunk[: cap - (size - len(chunk))])
            break
        parts.append(chunk)
    return b"".join(parts)

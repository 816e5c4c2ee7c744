"""A small, scriptable fault server for ``POST /v1/images/generations``, written from the
contract (``openapi.yaml`` + ``NOTES.md``) and independent of ``flux_async.emulator``.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) over asyncio streams
and imports nothing from flux_async or aiohttp, so a bug in the client cannot hide a bug
in the server. Every answer is chosen by a *scenario*::

    scenario(attempt, prompt, now) -> Action

``attempt`` is the 1-based count of requests seen with this ``Idempotency-Key`` (the
client sends one key per prompt and reuses it across retries), ``prompt`` the request's
prompt text and ``now`` seconds since the first generation request (since `reset`).

Counts are kept from the server's side: per key (prompt, attempts, the outcome of each,
which attempt got a 200) and in total (requests, 200s, 429s, 5xx, dropped connections).

In process::

    async with FaultServer(first(1, html_500())) as srv:
        async with FluxClient(base_url=srv.base_url) as client:
            results = await client.gather_generate(prompts)
        print(srv.stats.requests, srv.attempts_by_prompt())

As a subprocess (prints ``READY <base_url>`` once listening, serves ``GET /stats`` and
``POST /reset``, and prints its counts as JSON on SIGTERM)::

    python -m tests.faultserver --scenario html500-first --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import json
import signal
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

__all__ = [
    "OK",
    "PRESETS",
    "Action",
    "FaultServer",
    "KeyRecord",
    "Preset",
    "Scenario",
    "Stats",
    "always",
    "drop",
    "drop_mid_body",
    "error",
    "first",
    "flaky",
    "gzip_bomb",
    "html_500",
    "huge",
    "json_503",
    "nested_json",
    "preset",
    "rate_limited",
    "raw",
    "slow",
]

GENERATIONS = "/v1/images/generations"
_CHUNK = 256 * 1024
_MAX_HEAD = 64 * 1024
# A 1x1 transparent PNG, for the image URLs the answers point at.
_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6300010000050001a5f645400000000049454e44ae426082"
)


# -- actions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """What the server does with one request.

    * ``status`` / ``body`` / ``content_type`` / ``headers``: the answer; ``body=None``
      means the contract's success body for 2xx, an OpenAI-format JSON error otherwise.
    * ``delay``: seconds to wait before answering (on top of the server's latency).
    * ``cut_after``: send the headers (with the full Content-Length) and this many body
      bytes, then close the connection.
    * ``drop``: close the connection without answering.
    * ``stream``: stream a generated body of this many bytes (``body`` is its prefix).
    * ``gzip_bomb``: send ``Content-Encoding: gzip`` with a gzip of this many zero bytes.
    """

    status: int = 200
    body: bytes | None = None
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    cut_after: int | None = None
    drop: bool = False
    stream: int | None = None
    gzip_bomb: int | None = None


Scenario = Callable[[int, str, float], Action]

#: A 200 with the contract's body.
OK = Action()


def error(
    status: int,
    message: str = "upstream failure",
    *,
    type_: str = "server_error",
    code: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> Action:
    """An OpenAI-format JSON error: ``{"error": {"message", "type", "code"}}``."""
    body = json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()
    return Action(status=status, body=body, headers=tuple(headers))


def html_500() -> Action:
    """A 500 with a proxy's HTML page as its body."""
    page = (
        b"<html><head><title>500 Internal Server Error</title></head>"
        b"<body><center><h1>500 Internal Server Error</h1></center><hr>"
        b"<center>nginx</center></body></html>"
    )
    return Action(status=500, body=page, content_type="text/html")


def json_503() -> Action:
    """A 503 with an OpenAI-format JSON body."""
    return error(503, "The engine is currently overloaded", code="service_unavailable")


def rate_limited(retry_after: str | None = None, retry_after_ms: str | None = None) -> Action:
    """A 429; the header values are sent verbatim (garbage included)."""
    headers = []
    if retry_after is not None:
        headers.append(("Retry-After", retry_after))
    if retry_after_ms is not None:
        headers.append(("retry-after-ms", retry_after_ms))
    return error(
        429,
        "Rate limit reached for requests",
        type_="requests",
        code="rate_limit_exceeded",
        headers=headers,
    )


def drop_mid_body(status: int = 200, sent: int = 16) -> Action:
    """Headers with the full Content-Length, ``sent`` body bytes, then close."""
    return Action(status=status, cut_after=sent)


def drop() -> Action:
    """Close the connection after reading the request, without answering."""
    return Action(drop=True)


def slow(seconds: float, then: Action = OK) -> Action:
    """``then``, answered after ``seconds``."""
    return replace(then, delay=then.delay + seconds)


def raw(
    status: int,
    body: bytes,
    content_type: str = "application/json",
    headers: Iterable[tuple[str, str]] = (),
) -> Action:
    """An answer with exactly this body (NaN, 1e400, non-UTF-8, truncated JSON ...)."""
    return Action(status=status, body=body, content_type=content_type, headers=tuple(headers))


def nested_json(depth: int = 100_000) -> bytes:
    """``[[[...]]]`` nested ``depth`` deep: valid JSON that no recursive parser survives."""
    return b"[" * depth + b"]" * depth


def huge(status: int, size: int) -> Action:
    """A ``size``-byte body, streamed (never held in memory), shaped like a valid answer."""
    if status < 300:
        prefix = b'{"created": 1, "data": [{"url": "http://127.0.0.1/'
    else:
        prefix = b'{"error": {"type": "server_error", "code": null, "message": "'
    return Action(status=status, body=prefix, stream=size)


def gzip_bomb(status: int, size: int) -> Action:
    """``Content-Encoding: gzip`` whose body inflates to ``size`` zero bytes."""
    return Action(status=status, gzip_bomb=size)


@lru_cache(maxsize=4)
def _gzip_of_zeros(size: int) -> bytes:
    """A gzip member inflating to ``size`` zero bytes (whole MiB), built in ~0.2 s.

    After a full flush deflate forgets its history, so every MiB of zeros compresses to
    the same bytes: compress one and repeat it, then add the gzip trailer.
    """
    mib = 1 << 20
    count = max(1, size // mib)
    zeros = bytes(mib)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, (count * mib) & 0xFFFFFFFF)
    return header + block * count + end + trailer


# -- scenarios -----------------------------------------------------------------------------


def always(action: Action) -> Scenario:
    """Every attempt gets ``action``."""

    def scenario(attempt: int, prompt: str, now: float) -> Action:
        return action

    return scenario


def first(n: int, action: Action, then: Action = OK) -> Scenario:
    """A key's first ``n`` attempts get ``action``, later ones ``then``."""

    def scenario(attempt: int, prompt: str, now: float) -> Action:
        return action if attempt <= n else then

    return scenario


def flaky(
    share: float,
    until: float,
    *,
    seed: int = 0,
    faults: tuple[Action, ...] | None = None,
    then: Action = OK,
) -> Scenario:
    """For ``until`` seconds, ``share`` of attempts fail with one of ``faults``.

    The draw is a seeded hash of (seed, prompt, attempt): the same run fails the same
    attempts whatever order they arrive in.
    """
    choices = faults if faults is not None else (html_500(), error(502, "bad gateway"), json_503())
    threshold = int(share * 2**32)

    def scenario(attempt: int, prompt: str, now: float) -> Action:
        if now >= until:
            return then
        draw = zlib.crc32(f"{seed}/{prompt}/{attempt}".encode())
        if draw < threshold:
            return choices[draw % len(choices)]
        return then

    return scenario


def token_bucket(
    rate: float, capacity: float, retry_after: str, refused: list[float] | None = None
) -> Scenario:
    """A server's token bucket: ``rate`` requests a second, ``capacity`` at once; a request
    that finds it empty gets a 429 with ``retry_after`` (its time appended to
    ``refused``, when given)."""
    bucket = {"tokens": capacity, "at": 0.0}

    def scenario(attempt: int, prompt: str, now: float) -> Action:
        bucket["tokens"] = min(capacity, bucket["tokens"] + (now - bucket["at"]) * rate)
        bucket["at"] = now
        if bucket["tokens"] < 1:
            if refused is not None:
                refused.append(now)
            return rate_limited(retry_after)
        bucket["tokens"] -= 1
        return OK

    return scenario


@dataclass(frozen=True)
class Preset:
    """A named scenario for subprocess mode and the benchmark.

    ``outage`` is ``(at, duration)``: the server goes down ``at`` seconds after the first
    generation request and comes back ``duration`` seconds later, on the same port.
    """

    scenario: Scenario
    outage: tuple[float, float] | None = None
    description: str = ""


GARBAGE_RETRY_AFTER = ("0 JAN 0 2147483648:0 GMT", "-5", "nan", "inf", "abc")
DAY = 86_400


def http_date(ts: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(ts))


def preset(name: str, *, slow_seconds: float = 3.0, window: float = 10.0, seed: int = 0) -> Preset:
    """The scenario called ``name`` (see `PRESETS`)."""
    if name == "ok":
        return Preset(always(OK), description="fault-free")
    if name == "html500-first":
        return Preset(first(1, html_500()), description="500 (HTML) on each first attempt")
    if name == "outage":
        return Preset(always(OK), outage=(0.5, 2.3), description="down 0.5 s in, back 2.3 s later")
    if name == "drop-mid-body-2":
        return Preset(
            first(2, drop_mid_body()), description="closed mid-body on the first 2 attempts"
        )
    if name == "slow-first":
        return Preset(
            first(1, slow(slow_seconds)),
            description=f"first attempt answered after {slow_seconds:g} s",
        )
    if name == "429-ra1-2":
        return Preset(
            first(2, rate_limited("1")), description="429 Retry-After: 1 on the first 2 attempts"
        )
    if name == "429-always":
        return Preset(always(rate_limited("1")), description="429 Retry-After: 1 on every attempt")
    if name == "flaky-30":
        return Preset(
            flaky(0.3, window, seed=seed),
            description=f"30% 5xx for {window:g} s, then healthy",
        )
    if name == "bucket-40-ra5":
        return Preset(
            token_bucket(40.0, 40.0, "5"),
            description="a token bucket of 40/s, 40 at once; 429 Retry-After: 5 when empty",
        )
    if name == "storm-ra2":

        def storm(attempt: int, prompt: str, now: float) -> Action:
            return rate_limited("2") if now < window else OK

        return Preset(storm, description=f"429 Retry-After: 2 to everything for {window:g} s")
    if name == "quota-spent":
        return Preset(
            always(rate_limited("3600")), description="429 Retry-After: 3600 on every attempt"
        )
    if name == "retry-after-day":
        return Preset(first(1, rate_limited(str(DAY))), description="429 Retry-After: 86400 once")
    if name == "garbage-retry-after":

        def scenario(attempt: int, prompt: str, now: float) -> Action:
            if attempt > 1:
                return OK
            value = GARBAGE_RETRY_AFTER[zlib.crc32(prompt.encode()) % len(GARBAGE_RETRY_AFTER)]
            # A 503, not a 429: the rate limiter reads a 429 on every prompt as overload
            # and slows everyone down, which is its business and not what this tests.
            return replace(json_503(), headers=(("Retry-After", value),))

        return Preset(scenario, description="503 with a garbage Retry-After once")
    raise KeyError(f"no preset named {name!r}; known: {', '.join(PRESETS)}")


PRESETS = (
    "ok",
    "html500-first",
    "outage",
    "drop-mid-body-2",
    "slow-first",
    "429-ra1-2",
    "429-always",
    "flaky-30",
    "retry-after-day",
    "garbage-retry-after",
    "bucket-40-ra5",
    "storm-ra2",
    "quota-spent",
)


# -- counts --------------------------------------------------------------------------------


@dataclass
class KeyRecord:
    """One Idempotency-Key as the server saw it.

    ``outcomes`` has one entry per attempt: the status sent in full (``200``, ``429``,
    ...), or ``"dropped"`` (closed by the scenario), ``"gone"`` (the client left before
    the answer was complete), ``"aborted"`` (cut by an outage).
    """

    prompt: str
    attempts: int = 0
    ok_attempt: int | None = None
    outcomes: list[int | str] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "attempts": self.attempts,
            "ok_attempt": self.ok_attempt,
            "outcomes": self.outcomes,
            "bytes_sent": self.bytes_sent,
        }


@dataclass
class Stats:
    """Totals over every generation request since the last `FaultServer.reset`."""

    requests: int = 0
    ok: int = 0  # 2xx answers sent in full
    rate_limited: int = 0  # 429s sent
    server_errors: int = 0  # 5xx sent (headers out)
    dropped: int = 0  # connections the scenario closed mid-request
    aborted: int = 0  # requests cut by an outage
    gone: int = 0  # the client left before the answer was complete
    statuses: Counter[int] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "rate_limited": self.rate_limited,
            "server_errors": self.server_errors,
            "dropped": self.dropped,
            "aborted": self.aborted,
            "gone": self.gone,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
        }


def summarize(keys: dict[str, KeyRecord]) -> dict[str, Any]:
    """Per-prompt facts derived from the key records (in-process and from ``/stats``)."""
    prompts: Counter[str] = Counter()
    oks: Counter[str] = Counter()
    keys_per_prompt: Counter[str] = Counter()
    for record in keys.values():
        prompts[record.prompt] += record.attempts
        keys_per_prompt[record.prompt] += 1
        oks[record.prompt] += sum(
            1 for o in record.outcomes if isinstance(o, int) and 200 <= o < 300
        )
    return {
        "prompts": len(prompts),
        "attempts": sum(prompts.values()),
        "duplicates": sorted(p for p, n in oks.items() if n > 1),
        "multi_key_prompts": sorted(p for p, n in keys_per_prompt.items() if n > 1),
    }


# -- the server ----------------------------------------------------------------------------


class _Gone(Exception):
    """The client went away before the answer was complete."""


class FaultServer:
    """The fault server. ``async with FaultServer(scenario) as srv: srv.base_url``.

    ``latency`` is added to every generation answer's delay. ``outage=(at, duration)``
    takes the server down ``at`` seconds after the first generation request. `stop`
    closes the listener and aborts every open connection; `start` listens again on the
    same port.
    """

    def __init__(
        self,
        scenario: Scenario | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        outage: tuple[float, float] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.scenario: Scenario = scenario if scenario is not None else always(OK)
        self.host = host
        self.port = port
        self.latency = latency
        self.outage = outage
        self.api_key = api_key
        self.stats = Stats()
        self.keys: dict[str, KeyRecord] = {}
        self.outages = 0
        #: Generation requests seen when each outage began.
        self.outage_requests: list[int] = []
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._first_at: float | None = None
        self._outage_task: asyncio.Task[None] | None = None
        self._images = 0
        self._unkeyed = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0

    # -- lifecycle --

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> FaultServer:
        """Listen (again) on ``port``; the first start picks a free port when it is 0."""
        if self._server is not None:
            return self
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True, limit=_MAX_HEAD
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the listener and abort every open connection (an outage, or the end)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # Tasks leave `_conns` themselves when they end, so a stop that is itself
        # cancelled leaves nothing behind that the next stop would not find.
        conns = list(self._conns.items())
        for task, writer in conns:
            writer.transport.abort()
            task.cancel()
        if conns:
            await asyncio.wait([task for task, _ in conns])
        if server is not None:
            await server.wait_closed()

    async def aclose(self) -> None:
        """Stop for good, cancelling a scheduled outage."""
        task, self._outage_task = self._outage_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.stop()

    async def __aenter__(self) -> FaultServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def schedule_outage(self, at: float, duration: float) -> asyncio.Task[None]:
        """Go down ``at`` seconds from now for ``duration`` seconds (a task; await it)."""

        async def outage() -> None:
            await asyncio.sleep(at)
            self.outage_requests.append(self.stats.requests)
            await self.stop()
            self.outages += 1
            await asyncio.sleep(duration)
            await self.start()

        task = asyncio.get_running_loop().create_task(outage())
        self._outage_task = task
        return task

    def reset(self) -> None:
        """Zero every count and the scenario clock."""
        self.stats = Stats()
        self.keys = {}
        self._first_at = None

    async def wait_idle(self) -> None:
        """Return once no generation request is being answered."""
        await self._idle.wait()

    def connection_tasks(self) -> set[asyncio.Task[None]]:
        """The server's own per-connection tasks (to tell them from a client's)."""
        return set(self._conns)

    # -- views --

    def attempts_by_prompt(self) -> Counter[str]:
        """Attempts the server saw per prompt (all keys of the prompt together)."""
        out: Counter[str] = Counter()
        for record in self.keys.values():
            out[record.prompt] += record.attempts
        return out

    def summary(self) -> dict[str, Any]:
        return summarize(self.keys)

    def to_json(self, *, keys: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "totals": self.stats.to_json(),
            "outages": self.outages,
            "outage_requests": self.outage_requests,
            **summarize(self.keys),
        }
        if keys:
            out["keys"] = {k: r.to_json() for k, r in self.keys.items()}
        return out

    # -- HTTP --

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._server is None:  # accepted just as we stopped
            writer.transport.abort()
            return
        self._conns[task] = writer
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, target, _ = lines[0].split(" ", 2)
                except ValueError:
                    return
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                try:
                    body = await reader.readexactly(int(headers.get("content-length", "0")))
                except (asyncio.IncompleteReadError, ValueError, OSError):
                    return
                try:
                    keep = await self._route(reader, writer, method, target, headers, body)
                except (_Gone, OSError):
                    return
                if not keep:
                    return
        except asyncio.CancelledError:
            # Only `stop` cancels these tasks, and it aborts the connection as well. The
            # task ends normally: on Python 3.11, start_server's done-callback calls
            # task.exception() on it and would log the CancelledError as an error.
            writer.transport.abort()
        finally:
            self._conns.pop(task, None)
            if self._server is None:
                writer.transport.abort()
            else:
                writer.close()

    async def _route(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
    ) -> bool:
        path = target.split("?", 1)[0]
        if method == "POST" and path == GENERATIONS:
            return await self._generation(reader, writer, headers, body)
        if method == "GET" and path == "/stats":
            data = json.dumps(self.to_json(keys="keys=1" in target)).encode()
            self._write(writer, 200, data, "application/json", ())
            return True
        if method == "POST" and path == "/reset":
            self.reset()
            self._write(writer, 200, b'{"reset": true}', "application/json", ())
            return True
        if method == "GET" and path.startswith("/img/"):
            self._write(writer, 200, _PNG, "image/png", ())
            return True
        answer = error(404, f"no route for {method} {path}", type_="invalid_request_error")
        self._write(writer, 404, answer.body or b"", "application/json", ())
        return True

    async def _generation(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        headers: dict[str, str],
        body: bytes,
    ) -> bool:
        stats = self.stats
        stats.requests += 1
        loop = asyncio.get_running_loop()
        if self._first_at is None:
            self._first_at = loop.time()
            if self.outage is not None and self._outage_task is None:
                self.schedule_outage(*self.outage)
        now = loop.time() - self._first_at
        try:
            payload = json.loads(body)
            prompt = payload["prompt"]
            n = int(payload.get("n") or 1)
            if not isinstance(prompt, str) or not prompt or not 1 <= n <= 10:
                raise ValueError(prompt)
        except (ValueError, KeyError, TypeError):
            answer = error(400, "invalid request body", type_="invalid_request_error")
            self._write(writer, 400, answer.body or b"", "application/json", ())
            stats.statuses[400] += 1
            return True
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            answer = error(401, "Incorrect API key provided", type_="invalid_request_error")
            self._write(writer, 401, answer.body or b"", "application/json", ())
            stats.statuses[401] += 1
            return True
        key = headers.get("idempotency-key")
        if key is None:
            self._unkeyed += 1
            key = f"(no key {self._unkeyed})"
        record = self.keys.get(key)
        if record is None:
            record = self.keys[key] = KeyRecord(prompt)
        record.attempts += 1
        attempt = record.attempts
        action = self.scenario(attempt, prompt, now)
        self._busy += 1
        self._idle.clear()
        outcome: int | str = "gone"
        sent = 0
        try:
            delay = action.delay + self.latency
            if delay > 0:
                await asyncio.sleep(delay)
            if reader.at_eof() or writer.transport.is_closing():
                raise _Gone
            if action.drop:
                outcome = "dropped"
                stats.dropped += 1
                return False
            outcome, sent = await self._answer(writer, action, n)
            if outcome == "dropped":
                stats.dropped += 1
                return False
            assert isinstance(outcome, int)
            if 200 <= outcome < 300:
                stats.ok += 1
                if record.ok_attempt is None:
                    record.ok_attempt = attempt
            return True
        except asyncio.CancelledError:
            outcome = "aborted"
            stats.aborted += 1
            raise
        except (_Gone, OSError):
            outcome = "gone"
            stats.gone += 1
            raise _Gone from None
        finally:
            record.outcomes.append(outcome)
            record.bytes_sent.append(sent)
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def _answer(
        self, writer: asyncio.StreamWriter, action: Action, n: int
    ) -> tuple[int | str, int]:
        """Send ``action``'s answer; (status or "dropped", body bytes sent)."""
        status = action.status
        stats = self.stats
        if status == 429:
            stats.rate_limited += 1
        elif status >= 500:
            stats.server_errors += 1
        stats.statuses[status] += 1
        extra = list(action.headers)
        if action.gzip_bomb is not None:
            data = _gzip_of_zeros(action.gzip_bomb)
            extra.append(("Content-Encoding", "gzip"))
            return status, await self._send_big(writer, status, data, len(data), action, extra)
        if action.stream is not None:
            prefix = action.body or b""
            return status, await self._send_big(
                writer, status, prefix, action.stream, action, extra
            )
        body = action.body
        if body is None:
            body = self._default_body(status, n)
        if action.cut_after is not None:
            cut = min(action.cut_after, max(len(body) - 1, 0))
            self._write(writer, status, body[:cut], action.content_type, extra, length=len(body))
            await writer.drain()
            return "dropped", cut
        self._write(writer, status, body, action.content_type, extra)
        if len(body) > _CHUNK:
            await writer.drain()
        return status, len(body)

    async def _send_big(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        prefix: bytes,
        size: int,
        action: Action,
        extra: list[tuple[str, str]],
    ) -> int:
        """Stream ``size`` bytes (``prefix``, then filler) with flow control."""
        self._write(writer, status, b"", action.content_type, extra, length=size)
        sent = 0
        first = prefix[:size]
        if first:
            writer.write(first)
            sent = len(first)
        filler = b"x" * _CHUNK
        while sent < size:
            if writer.transport.is_closing():
                raise _Gone
            n = min(_CHUNK, size - sent)
            writer.write(filler if n == _CHUNK else filler[:n])
            sent += n
            try:
                await writer.drain()
            except OSError:
                raise _Gone from None
        return sent

    def _default_body(self, status: int, n: int) -> bytes:
        if status < 300:
            data = []
            for _ in range(n):
                self._images += 1
                data.append({"url": f"http://{self.host}:{self.port}/img/{self._images}.png"})
            return json.dumps({"created": int(time.time()), "data": data}).encode()
        if status == 429:
            return rate_limited().body or b""
        if status >= 500:
            return error(status).body or b""
        return error(status, http_phrase(status), type_="invalid_request_error").body or b""

    @staticmethod
    def _write(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str,
        extra: Iterable[tuple[str, str]],
        *,
        length: int | None = None,
    ) -> None:
        if writer.transport.is_closing():
            raise _Gone
        lines = [
            f"HTTP/1.1 {status} {http_phrase(status)}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body) if length is None else length}",
        ]
        lines.extend(f"{name}: {value}" for name, value in extra)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(head + body if body else head)


def http_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# -- subprocess mode -----------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The fault server, in its own process.")
    parser.add_argument("--scenario", default="ok", choices=PRESETS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--slow", type=float, default=3.0, help="slow-first: seconds")
    parser.add_argument("--window", type=float, default=10.0, help="flaky-30, storm-ra2: seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keys", action="store_true", help="per-key records in the SIGTERM JSON")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    chosen = preset(args.scenario, slow_seconds=args.slow, window=args.window, seed=args.seed)
    server = FaultServer(
        chosen.scenario,
        host=args.host,
        port=args.port,
        latency=args.latency,
        outage=chosen.outage,
    )
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await server.start()
    print(f"READY {server.base_url}", flush=True)
    try:
        await done.wait()
    finally:
        await server.aclose()
    sys.stdout.write(json.dumps(server.to_json(keys=args.keys)) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(_parse_args(argv)))


if __name__ == "__main__":
    main()

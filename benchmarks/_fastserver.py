"""A minimal, fast HTTP/1.1 server for measuring what a client costs per request.

The bundled emulator validates, records and paces; on two cores it is the bottleneck of a
zero-latency run, which hides the client's own cost. This server does the least the
contract needs: every ``POST /v1/images/generations`` gets the same ``200`` JSON body,

    {"created": 1700000000, "data": [{"url": "https://img.example/x.png"}]}

over keep-alive connections, from a plain ``asyncio.Protocol`` (no uvloop, no aiohttp.web)
in its own process. Requests are parsed minimally but correctly: the head up to the blank
line, then exactly ``Content-Length`` bytes of body (chunked bodies are refused with
``501`` and the connection closed; pipelining is not needed, but back-to-back requests in
one read are answered in order). ``GET /_fast/stats`` and ``POST /_fast/reset`` read and
zero a request counter, so a benchmark can check every request reached the server.

Run on its own (it prints ``READY http://127.0.0.1:PORT/v1`` once listening, and exits on
SIGTERM, SIGINT or when its stdin closes, i.e. when the parent dies):

    python benchmarks/_fastserver.py [--port 0] [--latency SECONDS]

From a benchmark, `FastServerProcess` starts and stops it like `EmulatorProcess` (whose
``base_url`` / ``cpu_seconds`` it shares, so `_common.measure` takes either).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

BODY = b'{"created": 1700000000, "data": [{"url": "https://img.example/x.png"}]}'
ENDPOINT = b"/v1/images/generations"
# The head's fields are searched in a lower-cased copy; a head is ~300 bytes here.
_CONTENT_LENGTH = b"\r\ncontent-length:"
_TRANSFER_ENCODING = b"\r\ntransfer-encoding:"
_CONNECTION_CLOSE = b"\r\nconnection: close"
_MAX_HEAD = 64 * 1024


def _response(status: bytes, body: bytes, *, close: bool = False) -> bytes:
    head = [
        b"HTTP/1.1 " + status,
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
    ]
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


OK = _response(b"200 OK", BODY)
NOT_FOUND = _response(b"404 Not Found", b'{"error": {"message": "not found"}}')
BAD_REQUEST = _response(b"400 Bad Request", b'{"error": {"message": "bad request"}}', close=True)
NOT_IMPLEMENTED = _response(
    b"501 Not Implemented", b'{"error": {"message": "chunked bodies"}}', close=True
)


class _Stats:
    requests = 0
    latency = 0.0  # seconds each generation answer is held back (--latency)


class HTTPProtocol(asyncio.Protocol):
    """One keep-alive connection: heads, Content-Length bodies, the constant answer."""

    __slots__ = ("_buffer", "_transport")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        transport = self._transport
        while transport is not None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    self._reply(BAD_REQUEST, close=True)
                    return
                break
            head = buffer[:end].lower()
            length = 0
            at = head.find(_CONTENT_LENGTH)
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                try:
                    length = int(head[at + len(_CONTENT_LENGTH) : None if stop < 0 else stop])
                except ValueError:
                    length = -1
                if length < 0:
                    self._reply(BAD_REQUEST, close=True)
                    return
            elif head.find(_TRANSFER_ENCODING) >= 0:
                self._reply(NOT_IMPLEMENTED, close=True)
                return
            total = end + 4 + length
            if len(buffer) < total:
                break  # the body is still on its way
            line_end = head.find(b"\r\n")
            request_line = buffer[: end if line_end < 0 else line_end].split(b" ")
            close = head.find(_CONNECTION_CLOSE) >= 0
            buffer = buffer[total:]
            if len(request_line) != 3:
                self._reply(BAD_REQUEST, close=True)
                return
            method, target, _ = request_line
            if method == b"POST" and target == ENDPOINT:
                _Stats.requests += 1
                if _Stats.latency:
                    # One request at a time per connection (no pipelining from clients),
                    # so a constant delay keeps answers in order.
                    asyncio.get_running_loop().call_later(_Stats.latency, self._reply_later, close)
                else:
                    self._reply(OK, close=close)
            elif target.startswith(b"/_fast/"):
                self._control(method, target, close)
            else:
                self._reply(NOT_FOUND, close=close)
            transport = self._transport
        self._buffer = buffer

    def _control(self, method: bytes, target: bytes, close: bool) -> None:
        if method == b"GET" and target == b"/_fast/stats":
            body = json.dumps({"requests": _Stats.requests}).encode()
            self._reply(_response(b"200 OK", body), close=close)
        elif method == b"POST" and target == b"/_fast/reset":
            _Stats.requests = 0
            self._reply(_response(b"200 OK", b"{}"), close=close)
        else:
            self._reply(NOT_FOUND, close=close)

    def _reply_later(self, close: bool) -> None:
        self._reply(OK, close=close)

    def _reply(self, payload: bytes, *, close: bool = False) -> None:
        transport = self._transport
        if transport is None:
            return
        transport.write(payload)
        if close:
            transport.close()
            self._transport = None
            self._buffer = b""


async def serve(host: str, port: int) -> None:
    """Listen, print ``READY <base_url>``, serve until SIGTERM / SIGINT / stdin EOF."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def finish() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, finish)
    stdin = sys.stdin.fileno() if sys.stdin is not None else -1
    if stdin >= 0 and not os.isatty(stdin):
        # The parent holds the other end of this pipe: EOF means it is gone.
        def on_stdin() -> None:
            try:
                data = os.read(stdin, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(stdin)
                finish()

        with contextlib.suppress(OSError, ValueError, NotImplementedError):
            loop.add_reader(stdin, on_stdin)
    server = await loop.create_server(HTTPProtocol, host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"READY http://{host}:{bound}/v1", flush=True)
    async with server:
        await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (the default)")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds before each generation answer"
    )
    args = parser.parse_args(argv)
    _Stats.latency = args.latency
    # Long-lived, allocation-light: keep the collector off the request path.
    gc.freeze()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


# -- from a benchmark: the server in its own process --------------------------------------

if __name__ == "__main__":
    sys.exit(main())
else:
    # Only the parent needs the harness (it imports aiohttp and flux_async): the server
    # process stays standard-library only, and starts whatever state flux_async/ is in.
    from _common import EmulatorProcess

    class FastServerProcess(EmulatorProcess):
        """``python benchmarks/_fastserver.py --port 0`` as a context manager.

        Same life cycle as `EmulatorProcess` (waits for ``READY``, SIGTERM then SIGKILL
        on every exit path, ``cpu_seconds()`` from ``/proc``); it also dies with us: its
        stdin is a pipe from this process, and on Linux it gets SIGTERM when we die.

        Example::

            with FastServerProcess() as server:
                print(server.base_url, server.stats()["requests"])
        """

        def __init__(self, *args: str, ready_timeout: float = 30.0) -> None:
            super().__init__(*args, ready_timeout=ready_timeout)

        stdin_pipe = True

        def command(self) -> list[str]:
            return [sys.executable, str(Path(__file__).resolve()), *self.args]

        def stop(self) -> None:
            proc = self._proc
            if proc is not None and proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            super().stop()

        def stats(self) -> dict[str, Any]:
            """``{"requests": N}``: generation requests answered since the last reset."""
            return self._get_json("/_fast/stats")

        def reset(self) -> None:
            """Zero the request counter."""
            self._get_json("/_fast/reset", method="POST")

        def request_log(self) -> list[tuple[float, str, int | None]]:
            raise NotImplementedError("the fast server keeps no request log")

"""Saving images inside a fan-out: generated prompts/s with ``save_to=`` on vs off.

Setup: 3,000 prompts, concurrency 64, against a fast constant-answer server in its own
process (this file, run with ``--serve``: standard library only, like ``_fastserver.py``),
so the figure is what saving costs the client, not what a server takes. Two ways an image
comes back, each measured off and on:

* ``b64``: the answer carries the PNG as ``b64_json`` (a ~6 KB picture); saving decodes
  it and writes the file;
* ``url``: the answer carries a URL on the same server; saving GETs it through the
  client's pool (a second HTTP exchange per prompt) and writes the file.

Every file is written as the library always writes: a temporary file in the same
directory, fsync, rename, fsync of the directory, in a worker thread, on local disk (a
fresh directory under the system temp dir, removed after each run). Each mode is warmed
up once, then run ``--rounds`` times (3) interleaved; medians are compared.

Target: with b64 images, saving keeps >= 0.85x the prompts/s of not saving. The url
figure is shown for information: it adds an HTTP exchange per prompt, which against a
server answering in microseconds is as costly as the generation itself; against a real
model (seconds per image) it is noise.

    python benchmarks/bench_save.py [--prompts 3000] [--concurrency 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import struct
import sys
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _common import BenchOutput

# -- the server (standard library only: it runs as `python bench_save.py --serve MODE`) ------

_ENDPOINT = b"/v1/images/generations"


def _png(width: int = 96, height: int = 96) -> bytes:
    """A real RGB gradient PNG, made with zlib alone."""
    rows = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in (x * 255 // width, y * 255 // height, 128))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 6))
        + chunk(b"IEND", b"")
    )


def _response(status: bytes, body: bytes, content_type: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


class _ImageServer(asyncio.Protocol):
    """Keep-alive HTTP/1.1: POST the endpoint -> a constant answer; GET /img/* -> a PNG."""

    generations = 0
    latency = 0.0
    ok = b""
    image = b""
    stats_answer = b""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while self.transport is not None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            length = 0
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : None if stop < 0 else stop])
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length :]
            method, target, _ = head.split(b"\r\n", 1)[0].split(b" ")
            if method == b"POST" and target == _ENDPOINT:
                _ImageServer.generations += 1
                if _ImageServer.latency:
                    # One request at a time per connection: answering later keeps order.
                    loop = asyncio.get_running_loop()
                    loop.call_later(_ImageServer.latency, self._answer, _ImageServer.ok)
                else:
                    self.transport.write(_ImageServer.ok)
            elif method == b"GET" and target.startswith(b"/img/"):
                self.transport.write(_ImageServer.image)
            elif target == b"/_fast/stats":
                body = json.dumps({"requests": _ImageServer.generations}).encode()
                self.transport.write(_response(b"200 OK", body, b"application/json"))
            elif target == b"/_fast/reset":
                _ImageServer.generations = 0
                self.transport.write(_response(b"200 OK", b"{}", b"application/json"))
            else:
                self.transport.write(_response(b"404 Not Found", b"{}", b"application/json"))
        self.buffer = buffer

    def _answer(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def _serve(mode: str, port: int, latency: float) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    server = await loop.create_server(_ImageServer, "127.0.0.1", port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    png = _png()
    _ImageServer.latency = latency
    if mode == "b64":
        item = {"b64_json": base64.b64encode(png).decode()}
    else:
        item = {"url": f"http://127.0.0.1:{port}/img/lighthouse.png"}
    body = json.dumps({"created": 1700000000, "data": [item]}).encode()
    _ImageServer.ok = _response(b"200 OK", body, b"application/json")
    _ImageServer.image = _response(b"200 OK", png, b"image/png")
    print(f"READY http://127.0.0.1:{port}/v1", flush=True)
    async with server:
        await stop


# -- the benchmark ------------------------------------------------------------------------------

TARGET = 0.85
MODES = ("b64", "url")
#: (mode, server latency): the fast server, and one answering like a (very fast) model.
CASES = (("b64", 0.0), ("url", 0.0), ("url", 0.2))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1,000 prompts, 1 round (smoke)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per run (3000)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prompts is None:
        args.prompts = 1000 if args.quick else 3000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


def run(args: argparse.Namespace) -> BenchOutput:
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from _common import BenchOutput, EmulatorProcess, Row, median, prompts

    from flux_async import FluxClient

    class ImageServerProcess(EmulatorProcess):
        """This file with ``--serve MODE``, started and stopped like the emulator."""

        def command(self) -> list[str]:
            return [sys.executable, str(Path(__file__).resolve()), *self.args]

        def stats(self) -> dict[str, object]:
            return self._get_json("/_fast/stats")

    n, c = args.prompts, args.concurrency

    async def batch(base_url: str, save: bool, count: int) -> tuple[float, int, int]:
        directory = Path(tempfile.mkdtemp(prefix="flux-bench-save-")) if save else None
        try:
            async with FluxClient(base_url=base_url, max_connections=2 * c) as client:
                started = time.perf_counter()
                results = await client.gather_generate(
                    prompts(count), concurrency=c, save_to=directory
                )
                wall = time.perf_counter() - started
            saved = 0 if directory is None else len(os.listdir(directory))
            return wall, sum(r.ok for r in results), saved
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    rates: dict[tuple[str, float, bool], list[float]] = {}
    problems: list[str] = []
    print(f"saving: {n} prompts, concurrency {c}, {args.rounds} round(s)")
    for mode, latency in CASES:
        with ImageServerProcess("--serve", mode, "--latency", str(latency)) as server:
            base_url = server.base_url
            for save in (False, True):  # warm-up
                asyncio.run(batch(base_url, save, 2 * c))
            for round_ in range(args.rounds):
                order = (False, True) if round_ % 2 == 0 else (True, False)
                for save in order:
                    wall, ok, saved = asyncio.run(batch(base_url, save, n))
                    rate = ok / wall
                    rates.setdefault((mode, latency, save), []).append(rate)
                    label = "on " if save else "off"
                    print(
                        f"  {mode:>3} latency {latency:g} s, save {label}: "
                        f"{rate:8.0f} prompts/s ({wall:.2f} s)"
                    )
                    if ok != n or (save and saved != n):
                        problems.append(f"{mode} save={save}: {ok} ok, {saved} files of {n}")

    rows = []
    notes = []
    for mode, latency in CASES:
        off = median(rates[(mode, latency, False)])
        on = median(rates[(mode, latency, True)])
        ratio = on / off
        gated = (mode, latency) == ("b64", 0.0)
        server = "fast server" if not latency else f"{latency:g} s server latency"
        rows.append(
            Row(
                figure=f"prompts/s, save_to on ÷ off, {mode} images, {server} (n={n}, c={c})",
                flux=f"{on:.0f}/s",
                peer=f"off {off:.0f}/s",
                ratio=f"{ratio:.2f}",
                target=f">= {TARGET:.2f}" if gated else "(info)",
                met=(ratio >= TARGET and not problems) if gated else None,
            )
        )
        notes.append(
            f"{mode}, {server}: off {off:.0f} prompts/s, on {on:.0f} prompts/s ({ratio:.2f}x)"
        )
    notes += problems
    return BenchOutput("saving images", rows, notes)


def main() -> int:
    args = parse_args()
    if args.serve is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args.serve, args.port, args.latency))
        return 0
    run(args).print()
    return 0


if __name__ == "__main__":
    if "--serve" in sys.argv:
        sys.exit(main())
    from _common import run_main

    run_main(main)
